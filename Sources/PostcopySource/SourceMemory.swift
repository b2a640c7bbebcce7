import CPostcopy
import PostcopyCore
import PostcopyWire
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// What a source serves: guest RAM from a memory file (mapped, never copied into
/// the heap), the device state, and what a scan of RAM finds (zero pages,
/// digests). RAM may be live (a guest still runs on it) until `freeze`: the
/// device state is served from then on, and the scan runs in the background so
/// that the pause (downtime) does not wait for it. The scan publishes the zero
/// pages first (a quick pass: the holes of the memory file without touching
/// them, then the first bytes of most pages), the digests after (every byte).
public final class SourceMemory: Sendable {
    public let mapping: MemoryMapping
    public let table: RegionTable
    /// The memory file behind `mapping` (at offset 0), when there is one: its
    /// holes are zero pages that are never read through the mapping, since a
    /// read fault on a shmem hole allocates and clears a page.
    let holes: FileHoles?
    private struct State {
        var deviceState: [UInt8]?
        var frozenAt: UInt64 = 0
        var zeros: ZeroPages?
        var scan: MemoryScan?
        /// The whole zero map waits for the first pass (`waitForZeroPages`): it
        /// runs at the stream's priority, not `scanNice`. (Maps asked for by
        /// chunk do not: `zeroBits`.)
        var zerosUrgent = false
        /// The first pass by chunks, once frozen.
        var zeroPass: ZeroPass?
        /// `slowZeroPassForTests`.
        var testZeroPassDelayPerChunk = 0
    }
    private let state = Locked(State())
    private let frozenEvent: EventFD
    private let zerosEvent: EventFD
    private let scannedEvent: EventFD
    /// Signalled when the digests are wanted: see `wantDigests`.
    private let digestsWanted: EventFD
    /// Signalled when the zero pages are wanted (a zero map asked for, or the
    /// digests): a destination that precopied RAM needs none, and the pass
    /// would take CPU from its guest's first moments.
    private let zerosWanted: EventFD

    /// The nice value of the scan's passes that nobody waits on (the digests,
    /// and the zero pass when only they want it). Measured on one 2-core
    /// machine (1 GiB zipf guest, hybrid): at nice 0 and 10 the two passes took
    /// 35 % of both cores in the destination guest's first 100 ms (it runs at
    /// the same time on the other host's CPU in a real migration, but the
    /// source host's guest is paused then: this CPU is its to give). At 19 a
    /// pass takes about 1.5 % of a CPU that others want, and all of an idle one.
    static let scanNice: Int32 = 19

    deinit { state.withLock { $0.zeroPass?.cancel() } }

    /// Tests only, before `freeze`: the zero pass's own thread waits this long
    /// before each chunk, so that only the chunks asked for are done for a while.
    public func slowZeroPassForTests(microsecondsPerChunk: Int) {
        state.withLock { $0.testZeroPassDelayPerChunk = microsecondsPerChunk }
    }

    /// Serves `mapping` as one region. Call `freeze` when the guest is paused.
    /// `file`: the memory file mapped at offset 0 (duplicated, so the caller
    /// keeps its own), whose holes the scan skips.
    public init(mapping: MemoryMapping, pageSize: Int, file: Int32? = nil) throws(SystemError) {
        guard mapping.length > 0, mapping.length % pageSize == 0 else {
            throw SystemError("guest memory of \(mapping.length) bytes is not a positive multiple of the page size \(pageSize)", errno: EINVAL)
        }
        self.mapping = mapping
        table = RegionTable(pageSize: pageSize, regions: [RegionDescriptor(size: UInt64(mapping.length), sourceOffset: 0, name: "ram")])
        holes = try file.map { fd throws(SystemError) in try FileHoles(duplicating: fd) }
        frozenEvent = try EventFD()
        zerosEvent = try EventFD()
        scannedEvent = try EventFD()
        digestsWanted = try EventFD()
        zerosWanted = try EventFD()
    }

    /// Maps a memory file nobody writes any more, read-only, freezes and scans it now.
    public convenience init(file: MemoryFile, pageSize: Int, deviceState: [UInt8]) throws(SystemError) {
        guard file.size > 0, file.size % pageSize == 0 else {
            throw SystemError("memory file \(file.path) is \(file.size) bytes, not a positive multiple of the page size \(pageSize)", errno: EINVAL)
        }
        try self.init(mapping: try MemoryMapping.file(fd: file.fd.raw, length: file.size, writable: false),
                      pageSize: pageSize, file: file.fd.raw)
        // Someone waits for this scan (the source serves nothing before it): no nice.
        freeze(deviceState: deviceState, scanWaitedFor: true)
        _ = waitForScan()
    }

    /// The guest is paused: RAM will not change any more. Publishes the device
    /// state at once and scans RAM on a background thread.
    /// `scanWaitedFor`: the caller waits for the whole scan (no `scanNice`).
    public func freeze(deviceState: [UInt8], scanWaitedFor: Bool = false) {
        let first: Bool = state.withLock {
            guard $0.deviceState == nil else { return false }
            $0.deviceState = deviceState
            $0.frozenAt = nowNanoseconds()
            return true
        }
        guard first else { return }
        frozenEvent.signal()
        // The zero pass is short and the background stream waits for it (a
        // zero map). The digests only check the migration: they wait until
        // they are wanted (every page sent, or someone asks), then run at
        // `scanNice`, so that they never take CPU from the stream, the demand
        // faults or a guest.
        let scanner = MemoryScanner(mapping: mapping, pageSize: table.pageSize, holes: holes)
        let pass = state.withLock { s in
            let p = ZeroPass(scanner: scanner, delayPerChunkMicroseconds: s.testZeroPassDelayPerChunk)
            s.zeroPass = p
            return p
        }
        let zerosWanted = self.zerosWanted
        let t = PThread(name: "src-scan") { [weak self] in
            while cpc_poll1(zerosWanted.fd.raw, Int16(POLLIN), 1000) == 0 {
                if self == nil { return }  // nobody will ever ask
            }
            guard let zerosUrgent = self?.state.withLock({ $0.zerosUrgent }) else { return }
            let nice = scanWaitedFor ? 0 : Self.scanNice
            if !zerosUrgent { _ = cpc_set_thread_nice(nice) }
            guard pass.runAll() else { return }
            let (bits, holeBits) = pass.result()
            scanner.holeBits = holeBits
            let zeros = ZeroPages(bits)
            guard let wanted = self?.publish(zeros: zeros) else { return }
            while cpc_poll1(wanted.fd.raw, Int16(POLLIN), 1000) == 0 {
                if self == nil { return }  // nobody will ever ask
            }
            _ = cpc_set_thread_nice(nice)
            let scan = scanner.digests(zeros: zeros, nice: nice)
            self?.publish(scan: scan)
        }
        _ = t  // detached; it ends when the scan is done
    }

    private func publish(zeros: ZeroPages) -> EventFD {
        state.withLock { $0.zeros = zeros }
        zerosEvent.signal()
        return digestsWanted
    }

    private func publish(scan: MemoryScan) {
        state.withLock { $0.scan = scan }
        scannedEvent.signal()
    }

    /// Starts the digest pass of the scan (once frozen) if it waits: called
    /// when every page holding data was sent, and by `waitForScan`.
    public func wantDigests() {
        zerosWanted.signal()
        digestsWanted.signal()
    }

    /// When a page was last served (or the guest paused): see `idleNanoseconds`.
    private let lastServed = Atomic<UInt64>(0)

    /// A page was served just now.
    func noteServed() { lastServed.store(nowNanoseconds(), ordering: .relaxed) }

    /// How long no page was served since the pause (0 before the pause).
    var idleNanoseconds: UInt64 {
        let since = max(lastServed.load(ordering: .relaxed), state.withLock { $0.frozenAt })
        return since == 0 ? 0 : nowNanoseconds() &- since
    }

    /// The number of zero pages, once the first pass is done.
    public var zeroPageCount: Int? { state.withLock { $0.zeros?.count } }

    public var isFrozen: Bool { state.withLock { $0.deviceState != nil } }

    /// The device state once frozen (waits up to `timeoutMs`, -1 forever).
    public func waitForDeviceState(timeoutMs: Int = -1) -> [UInt8]? {
        wait(frozenEvent, timeoutMs: timeoutMs) { $0.deviceState }
    }

    /// The zero pages once the first half of the scan is done.
    public func waitForZeroPages(timeoutMs: Int = -1) -> ZeroPages? {
        state.withLock { $0.zerosUrgent = true }
        zerosWanted.signal()
        return wait(zerosEvent, timeoutMs: timeoutMs) { $0.zeros }
    }

    /// Whether each page of [first, first+count) (global numbering) is zero:
    /// waits only for the first pass's chunks that cover them (and scans those
    /// nobody took yet on the caller's thread). Nil before the freeze.
    public func zeroBits(globalFirst first: Int, count: Int) -> ((Int) -> Bool)? {
        // Not urgent for the pass's own thread: the chunks asked for are
        // scanned here when nobody took them yet, and the rest of the pass
        // runs at `scanNice` (on CPU the stream leaves idle).
        let (zeros, pass) = state.withLock { s -> (ZeroPages?, ZeroPass?) in (s.zeros, s.zeroPass) }
        if let zeros { return zeros.contains }
        guard let pass else { return nil }
        zerosWanted.signal()
        return pass.zeroBits(first: first, count: count)
    }

    /// The scan once done.
    /// `wanting`: start the digests if they wait (see `wantDigests`).
    public func waitForScan(timeoutMs: Int = -1, wanting: Bool = true) -> MemoryScan? {
        if wanting { wantDigests() }
        return wait(scannedEvent, timeoutMs: timeoutMs) { $0.scan }
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

    /// Whether pages [first, first+count) are all zero (from the scan, or looked
    /// at now: a run with no data in the memory file is not read).
    func allZero(globalFirst first: Int, count: Int) -> Bool {
        if let zeros = state.withLock({ $0.zeros }) {
            return (first..<(first + count)).allSatisfy { zeros.contains($0) }
        }
        let pageSize = table.pageSize
        if let holes, holes.isHole(offset: first * pageSize, length: count * pageSize) { return true }
        return cpc_is_zero(mapping.base + first * pageSize, count * pageSize) != 0
    }
}
