import CPostcopy
import PostcopyCore
import PostcopyWire
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// What a scan of frozen guest RAM found.
public struct MemoryScan: Sendable {
    /// One bit per page (global numbering), set when the page is all zeros.
    public var zeroBits: [UInt8]
    public var zeroPages: Int
    /// xxh64 of every page, so a destination whose guest already runs can check
    /// the pages its guest has not written since resuming.
    public var pageDigests: [UInt64]
    /// `MemoryDigest` of all of RAM.
    public var digest: UInt64
}

/// What a source serves: guest RAM from a memory file (mapped, never copied into
/// the heap), the device state, and what a scan of RAM finds (zero pages,
/// digests). RAM may be live (a guest still runs on it) until `freeze`: the
/// device state is served from then on, and the scan runs in the background so
/// that the pause (downtime) does not wait for it.
public final class SourceMemory: Sendable {
    public let mapping: MemoryMapping
    public let table: RegionTable
    private struct State {
        var deviceState: [UInt8]?
        var frozenAt: UInt64 = 0
        var scan: MemoryScan?
    }
    private let state = Locked(State())
    private let frozenEvent: EventFD
    private let scannedEvent: EventFD

    /// Serves `mapping` as one region. Call `freeze` when the guest is paused.
    public init(mapping: MemoryMapping, pageSize: Int) throws(SystemError) {
        guard mapping.length > 0, mapping.length % pageSize == 0 else {
            throw SystemError("guest memory of \(mapping.length) bytes is not a positive multiple of the page size \(pageSize)", errno: EINVAL)
        }
        self.mapping = mapping
        table = RegionTable(pageSize: pageSize, regions: [RegionDescriptor(size: UInt64(mapping.length), sourceOffset: 0, name: "ram")])
        frozenEvent = try EventFD()
        scannedEvent = try EventFD()
    }

    /// Maps a memory file nobody writes any more, read-only, freezes and scans it now.
    public convenience init(file: MemoryFile, pageSize: Int, deviceState: [UInt8]) throws(SystemError) {
        guard file.size > 0, file.size % pageSize == 0 else {
            throw SystemError("memory file \(file.path) is \(file.size) bytes, not a positive multiple of the page size \(pageSize)", errno: EINVAL)
        }
        try self.init(mapping: try MemoryMapping.file(fd: file.fd.raw, length: file.size, writable: false), pageSize: pageSize)
        freeze(deviceState: deviceState)
        _ = waitForScan()
    }

    /// The guest is paused: RAM will not change any more. Publishes the device
    /// state at once and scans RAM on a background thread.
    public func freeze(deviceState: [UInt8]) {
        let first: Bool = state.withLock {
            guard $0.deviceState == nil else { return false }
            $0.deviceState = deviceState
            $0.frozenAt = nowNanoseconds()
            return true
        }
        guard first else { return }
        frozenEvent.signal()
        // The scan is background work: at nice 10 it never slows the switchover
        // or the demand faults that follow it.
        let t = PThread(name: "src-scan", priority: .low) { [self] in
            let scan = Self.scan(mapping, pageSize: table.pageSize)
            state.withLock { $0.scan = scan }
            scannedEvent.signal()
        }
        _ = t  // detached; it ends when the scan is done
    }

    public var isFrozen: Bool { state.withLock { $0.deviceState != nil } }

    /// The device state once frozen (waits up to `timeoutMs`, -1 forever).
    public func waitForDeviceState(timeoutMs: Int = -1) -> [UInt8]? {
        wait(frozenEvent, timeoutMs: timeoutMs) { $0.deviceState }
    }

    /// The scan once done.
    public func waitForScan(timeoutMs: Int = -1) -> MemoryScan? {
        wait(scannedEvent, timeoutMs: timeoutMs) { $0.scan }
    }

    /// The scan if it is done, without waiting.
    public var scanIfDone: MemoryScan? { state.withLock { $0.scan } }

    private func wait<T>(_ ev: EventFD, timeoutMs: Int, _ get: (State) -> T?) -> T? {
        let deadline = timeoutMs < 0 ? UInt64.max : nowNanoseconds() + UInt64(timeoutMs) * 1_000_000
        while true {
            if let v = state.withLock({ get($0) }) { return v }
            if nowNanoseconds() >= deadline { return nil }
            _ = cpc_poll1(ev.fd.raw, Int16(POLLIN), 100)
        }
    }

    /// Whether pages [first, first+count) are all zero (from the scan, or looked at now).
    func allZero(globalFirst first: Int, count: Int) -> Bool {
        if let scan = scanIfDone {
            return (first..<(first + count)).allSatisfy { scan.zeroBits[$0 >> 3] & (1 << UInt8($0 & 7)) != 0 }
        }
        return cpc_is_zero(mapping.base + first * table.pageSize, count * table.pageSize) != 0
    }

    /// Zero map and page digests in one pass (two threads), then the RAM digest.
    static func scan(_ m: MemoryMapping, pageSize: Int) -> MemoryScan {
        let pages = m.length / pageSize
        let bits = UnsafeMutableBufferPointer<UInt8>.allocate(capacity: (pages + 7) / 8)
        bits.initialize(repeating: 0)
        let hashes = UnsafeMutableBufferPointer<UInt64>.allocate(capacity: max(pages, 1))
        defer { bits.deallocate(); hashes.deallocate() }
        nonisolated(unsafe) let b = bits, h = hashes
        nonisolated(unsafe) let base = m.base
        let half = (pages / 2) & ~7  // split on a byte of the zero map
        let workers = [0..<half, half..<pages].map { range in
            PThread(name: "src-scan-part", priority: .low) {
                for p in range {
                    let page = base + p * pageSize
                    if cpc_is_zero(page, pageSize) != 0 { b[p >> 3] |= 1 << UInt8(p & 7) }
                    h[p] = cpc_xxh64(page, pageSize, 0)
                }
            }
        }
        workers.forEach { $0.join() }
        let zeroBits = Array(bits)
        var zeros = 0
        for byte in zeroBits { zeros += byte.nonzeroBitCount }
        return MemoryScan(zeroBits: zeroBits, zeroPages: zeros, pageDigests: Array(hashes.prefix(pages)),
                          digest: MemoryDigest.compute(regions: [m.bytes]))
    }
}
