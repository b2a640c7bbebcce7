import CPostcopy
import Foundation
import PostcopyCore
import PostcopyTransport
import PostcopyWire

/// The baseline of `guest resume --stop-and-copy`: no userfaultfd and no daemon;
/// all RAM comes over the source connection while the guest is paused, and the
/// guest itself tells the source when it has every page.
struct StopAndCopy: Sendable {
    /// Pages per request and requests in flight.
    static let batchPages = 256, window = 4

    let control: TCPTransport
    let table: RegionTable

    /// Copies every page into `ram` (says `copied` with --json); exits 1 on failure.
    func copy(into ram: MemoryMapping, json: Bool) throws {
        let c0 = nowNanoseconds()
        let copied: UInt64
        do { copied = try copyAll(into: ram) } catch { throw fail("stop-and-copy failed: \(error)") }
        if json { emitEvent(.copied(.init(bytes: copied, copyNs: nowNanoseconds() - c0))) }
    }

    /// Every page over the main connection, in batches, into plain memory; returns the bytes copied.
    func copyAll(into ram: MemoryMapping) throws -> UInt64 {
        let channel = try control.openChannel(.background)
        var next = 0, outstanding = 0, id: UInt64 = 1
        var copied: UInt64 = 0
        while next < table.totalPages || outstanding > 0 {
            while next < table.totalPages && outstanding < Self.window {
                let n = min(Self.batchPages, table.totalPages - next)
                try channel.submit(PageRequest(requestID: id, region: 0, pageClass: .background, pageOffset: UInt64(next), pageCount: UInt32(n)))
                id += 1
                next += n
                outstanding += 1
            }
            _ = cpc_poll1(channel.pollDescriptor, Int16(POLLIN), 1000)
            outstanding -= try channel.drainCompletions { (h, payload) throws(TransportError) in
                if !h.isZero {
                    (ram.base + Int(h.pageOffset) * table.pageSize).copyMemory(from: payload.baseAddress!, byteCount: payload.count)
                    copied += UInt64(payload.count)
                }
            }
        }
        return copied
    }

    /// With no daemon, this guest tells the source it has every page.
    func confirmComplete() {
        _ = try? control.complete(Complete(pagesReceived: UInt64(table.totalPages), digest: nil))
    }
}
