import CPostcopy
import Foundation
import Logging
import PostcopyCore
import PostcopyDestination
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// The message a VMM sends on its handoff socket, any time after the regions,
/// to enable paravirtual async page faults for its guest (as a guest writes
/// KVM's async-PF MSR): `{"apf":{"version":1}}` with three fds, in order the
/// channel memfd, the request eventfd (guest -> daemon) and the completion
/// eventfd (daemon -> guest). The guest's regions must be registered with
/// `UFFD_FEATURE_SIGBUS` for faults to come this way.
public enum APFEnable {
    public static let json = Array(#"{"apf":{"version":1}}"#.utf8)
    /// The largest channel accepted (a 64 Ki-entry request ring is 2 MiB).
    public static let maxBytes = 16 << 20

    static func parse(_ bytes: [UInt8]) throws(APFError) {
        struct Body: Decodable { struct Inner: Decodable { var version: Int }; var apf: Inner }
        guard let b = try? JSONDecoder().decode(Body.self, from: Data(bytes)) else {
            throw .badHeader("the message is not {\"apf\":{\"version\":1}}")
        }
        guard b.apf.version == Int(APF.version) else { throw .badHeader("APF version \(b.apf.version), this daemon speaks \(APF.version)") }
    }
}

/// The daemon's end of one guest's APF channel. The engine's fault thread takes
/// "page not present" requests from the shared ring itself (`take`); "page
/// ready" is posted by whichever engine thread installed the page (`post`), one
/// completion-eventfd write per batch. Completions that do not fit (the guest
/// has not consumed yet) wait and are retried by a small thread. A guest that
/// breaks the channel (indices out of range) loses APF (its parked tasks stay
/// parked, as a vCPU would on a lost page), never the daemon.
final class APFChannel: @unchecked Sendable {
    let mapping: MemoryMapping
    let requestFD: OwnedFD
    let completionFD: OwnedFD
    private let ring: Locked<APFDaemonRing>
    private let pending = Locked<[(token: UInt64, status: UInt32)]>([])
    private let engine: PostcopyEngine
    private let logger: Logger
    private let wake: EventFD
    private let stop: EventFD
    private var thread: PThread?
    let requests = Atomic<UInt64>(0)
    let completions = Atomic<UInt64>(0)
    let invalid = Atomic<UInt64>(0)
    let notifications = Atomic<UInt64>(0)
    private let broken = Atomic<Bool>(false)

    /// Adopts the three fds (closing them on failure too).
    init(memfd: Int32, requestFD: Int32, completionFD: Int32, engine: PostcopyEngine, logger: Logger) throws(APFError) {
        let mem = OwnedFD(memfd)
        self.requestFD = OwnedFD(requestFD)
        self.completionFD = OwnedFD(completionFD)
        var st = stat()
        guard fstat(memfd, &st) == 0, st.st_size >= APF.headerSize, st.st_size <= APFEnable.maxBytes else {
            throw .badHeader("channel memory of \(st.st_size) bytes (\(APF.headerSize)...\(APFEnable.maxBytes))")
        }
        do { mapping = try MemoryMapping.file(fd: mem.raw, length: Int(st.st_size), writable: true) } catch {
            throw .badHeader("cannot map the channel: \(error)")
        }
        mem.close()
        let buffer = UnsafeMutableRawBufferPointer(start: mapping.base, count: mapping.length)
        let layout = try APFLayout.parse(UnsafeRawBufferPointer(buffer))
        ring = Locked(APFDaemonRing(layout: layout, memory: buffer))
        self.engine = engine
        self.logger = logger
        do {
            wake = try EventFD()
            stop = try EventFD()
        } catch { throw .badHeader("eventfd: \(error)") }
        thread = PThread(name: "apf-retry") { [self] in retryLoop() }
        engine.attachAPF(APFHooks(requestFD: self.requestFD.raw,
                                  take: { [weak self] in self?.take() ?? [] },
                                  post: { [weak self] in self?.post($0) }))
    }

    private func fail(_ error: APFError) {
        guard !broken.exchange(true, ordering: .relaxed) else { return }
        logger.error("APF channel disabled: \(error)")
        engine.attachAPF(nil)
    }

    /// On the fault thread: every request posted so far.
    private func take() -> [(token: UInt64, address: UInt64)] {
        var v: UInt64 = 0
        _ = read(requestFD.raw, &v, 8)
        if broken.load(ordering: .relaxed) { return [] }
        var out: [(token: UInt64, address: UInt64)] = []
        do {
            try ring.withLock { (r: inout APFDaemonRing) throws(APFError) in
                while true {
                    let reqs = try r.takeRequests(max: 256)
                    if reqs.isEmpty { break }
                    out += reqs.map { (token: $0.token, address: $0.address) }
                }
            }
        } catch {
            fail(error)
            return []
        }
        requests.add(UInt64(out.count), ordering: .relaxed)
        return out
    }

    /// From any engine thread: "page ready" (or "not guest memory") for tokens.
    private func post(_ items: [(UInt64, APFStatus)]) {
        let invalidCount = items.reduce(0) { $0 + ($1.1 == .invalidAddress ? 1 : 0) }
        if invalidCount > 0 { invalid.add(UInt64(invalidCount), ordering: .relaxed) }
        pending.withLock { $0 += items.map { (token: $0.0, status: $0.1.rawValue) } }
        if !flush() { wake.signal() }
    }

    /// Posts what fits; true when nothing is left waiting.
    @discardableResult
    private func flush() -> Bool {
        if broken.load(ordering: .relaxed) { return true }
        do {
            return try pending.withLock { (p: inout [(token: UInt64, status: UInt32)]) throws(APFError) -> Bool in
                guard !p.isEmpty else { return true }
                let n = try ring.withLock { (r: inout APFDaemonRing) throws(APFError) in try r.postCompletions(p[...]) }
                if n > 0 {
                    p.removeFirst(n)
                    completions.add(UInt64(n), ordering: .relaxed)
                    var one: UInt64 = 1
                    _ = write(completionFD.raw, &one, 8)  // one notification for the batch
                    notifications.add(1, ordering: .relaxed)
                }
                return p.isEmpty
            }
        } catch {
            fail(error)
            return true
        }
    }

    private func retryLoop() {
        var waiting = false
        while true {
            let r = cpc_poll2(wake.fd.raw, stop.fd.raw, waiting ? 1 : 1000)
            if r < 0 || r & 2 != 0 { return }
            if r & 1 != 0 { wake.drain() }
            waiting = !flush()
        }
    }

    func close() {
        guard let t = thread else { return }
        thread = nil
        logger.info("APF channel closing: \(requests.load(ordering: .relaxed)) requests, \(completions.load(ordering: .relaxed)) completions, \(invalid.load(ordering: .relaxed)) invalid; engine \(engine.debugState)")
        engine.attachAPF(nil)
        stop.signal()
        t.join()
    }

    deinit { close() }
}
