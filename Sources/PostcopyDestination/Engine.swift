import CPostcopy
import Histogram
import Logging
import PostcopyCore
import PostcopyTransport
import PostcopyWire
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// Where a run of source pages lives in the address space the uffd serves:
/// `size` bytes at `base` hold source pages `sourceFirstPage...` (global numbering).
/// Standalone, one per source region; with a VMM, one per region it handed over.
public struct GuestRegion: Sendable, Equatable {
    public var base: UInt64
    public var size: Int
    public var sourceFirstPage: Int
    public init(base: UInt64, size: Int, sourceFirstPage: Int) {
        self.base = base
        self.size = size
        self.sourceFirstPage = sourceFirstPage
    }
    public var range: Range<UInt64> { base..<(base + UInt64(size)) }

    /// Why `regions` cannot serve `table`, or nil: they must tile the source's
    /// pages exactly (sorted, no gap, no overlap in either space, page-aligned).
    public static func layoutProblem(_ regions: [GuestRegion], table: RegionTable) -> String? {
        let ps = table.pageSize
        var next = 0
        for r in regions.sorted(by: { $0.sourceFirstPage < $1.sourceFirstPage }) {
            guard r.size > 0 else { return "a region of size 0 at 0x\(String(r.base, radix: 16))" }
            guard r.size % ps == 0, r.base % UInt64(ps) == 0 else {
                return "region at 0x\(String(r.base, radix: 16)) (\(r.size) bytes) is not aligned to the \(ps)-byte page size"
            }
            guard r.sourceFirstPage == next else {
                return r.sourceFirstPage < next
                    ? "regions overlap in the source memory at byte offset \(r.sourceFirstPage * ps)"
                    : "no region covers source memory bytes \(next * ps)..<\(r.sourceFirstPage * ps)"
            }
            next += r.size / ps
            guard next <= table.totalPages else {
                return "region at 0x\(String(r.base, radix: 16)) ends at byte \(next * ps), beyond the source memory of \(table.totalPages * ps) bytes"
            }
        }
        guard next == table.totalPages else {
            return "regions cover \(next * ps) bytes but the source memory has \(table.totalPages * ps)"
        }
        let byAddress = regions.sorted { $0.base < $1.base }
        for (a, b) in zip(byAddress, byAddress.dropFirst()) where a.range.overlaps(b.range) {
            return "regions overlap in the address space at 0x\(String(b.base, radix: 16))"
        }
        return nil
    }
}

/// A guest's async page fault channel, as the engine uses it: `take` returns the
/// "page not present" requests posted so far (called on the fault thread when
/// `requestFD` is readable; it must consume the eventfd); `post` delivers "page
/// ready" (or "not guest memory") for tokens, from any engine thread.
public struct APFHooks: Sendable {
    public var requestFD: Int32
    public var take: @Sendable () -> [(token: UInt64, address: UInt64)]
    public var post: @Sendable ([(UInt64, APFStatus)]) -> Void
    public init(requestFD: Int32, take: @escaping @Sendable () -> [(token: UInt64, address: UInt64)],
                post: @escaping @Sendable ([(UInt64, APFStatus)]) -> Void) {
        self.requestFD = requestFD
        self.take = take
        self.post = post
    }
}

/// Completion statuses reported with an async page fault's token.
public enum APFStatus: UInt32, Sendable {
    /// The page is present: re-execute the access.
    case ready = 0
    /// The address is not guest memory of this VM: the guest must not retry it.
    case invalidAddress = 1
}

/// Notices requests in flight that get no reply for `timeout` seconds (a source
/// that hangs, a reply lost): the caller then treats the connection as broken.
/// 0 waits forever.
struct StallWatch {
    let timeout: Double
    private var progressAt = nowNanoseconds()

    init(timeout: Double) { self.timeout = timeout }

    /// A reply arrived, or the first request of a burst left.
    mutating func progressed() { progressAt = nowNanoseconds() }

    /// How long to wait for events while requests are out: often enough to notice a stall.
    var pollMs: Int32 { timeout > 0 ? 250 : -1 }

    func check(inFlight: Int, _ what: String) throws(TransportError) {
        guard timeout > 0, inFlight > 0, Double(nowNanoseconds() - progressAt) / 1e9 > timeout else { return }
        throw .timedOut("no reply from the source to \(inFlight) \(what) request(s) for \(timeout) s")
    }
}

/// Scheduling knobs of the engine.
public struct EngineConfig: Sendable {
    /// Stream pages the guest has not asked for (off: demand only, for benchmarks).
    public var background = true
    /// Pages per background request.
    public var batchPages = 128
    /// Background requests kept in flight at most (bounds what a demand reply can
    /// wait behind in the kernel and what the background installer holds); nil:
    /// what the background channel suggests (RDMA: 16), else 4.
    public var window: Int? = nil
    /// Background bytes per second at most (0: as fast as the window allows).
    public var backgroundRate: Int = 0
    /// Seconds to keep reconnecting after the connection to the source breaks
    /// (guest threads stay parked meanwhile); 0 fails at the first break.
    public var recoveryDeadline: Double = 60
    /// Seconds without any reply while requests are in flight after which the
    /// connection counts as broken (a source that hangs, a reply lost): the
    /// engine reconnects and re-sends them. 0: wait forever.
    public var stallTimeout: Double = 20
    /// Scheduling of the background thread (see `ThreadPriority` for why normal is the default).
    public var backgroundPriority: ThreadPriority = .normal
    /// Page size of the guest memory the uffd serves: the source's page size, or
    /// 2 MiB for hugetlbfs-backed VMM memory (installed 2 MiB at a time: one
    /// fault fetches the 512 source pages of its huge page).
    public var guestPageSize: Int = 0
    public init() {}
}

/// Live counters, readable from another thread (progress bar).
public final class EngineCounters: Sendable {
    public let faults = Atomic<UInt64>(0)
    /// Faults that came as async "page not present" requests (a subset of `faults`).
    public let apfFaults = Atomic<UInt64>(0)
    public let faultsCoalesced = Atomic<UInt64>(0)
    public let demandPages = Atomic<UInt64>(0)
    public let backgroundPages = Atomic<UInt64>(0)
    public let zeroFaults = Atomic<UInt64>(0)
    public let settledPages = Atomic<Int>(0)
    public let eexist = Atomic<UInt64>(0)
    public let eagain = Atomic<UInt64>(0)
    public let removedRanges = Atomic<UInt64>(0)
    /// Pages the zero map says are zero (never transferred).
    public let zeroPagesKnown = Atomic<Int>(0)
    /// Pages the source flagged as zero in a reply (no payload sent).
    public let zeroPagesReceived = Atomic<UInt64>(0)
}

/// The destination engine: a fault thread serving userfaultfd faults on the
/// demand channel, a background thread streaming the rest, one page table they
/// share. Demand always goes first: it has its own channel and its own thread,
/// and background keeps at most `window` batches in flight.
public final class PostcopyEngine: @unchecked Sendable {
    public let uffd: Userfaultfd
    public let regions: [GuestRegion]
    public let table: RegionTable
    public let counters = EngineCounters()
    /// Service latency of each demand fault (uffd message read → page installed),
    /// one recorder per installing thread (fault thread, background thread),
    /// merged when read.
    private let latencyOnFaultThread = LatencyRecorder()
    private let latencyOnBackgroundThread = LatencyRecorder()
    public var faultLatencyHistogram: Histogram<UInt64> {
        LatencyRecorder.merged([latencyOnFaultThread, latencyOnBackgroundThread])
    }
    public var faultLatency: LatencySummary { LatencySummary(faultLatencyHistogram) }
    /// Total time guest threads waited on faults (QEMU's blocktime, summed over vCPUs).
    public var stallNanoseconds: UInt64 { latencyOnFaultThread.totalNanoseconds + latencyOnBackgroundThread.totalNanoseconds }
    let pages: PageStates
    private let config: EngineConfig
    private let logger: Logger
    /// The current channels; replaced (generation + 1) by a reconnect.
    private let channelLock = NSLockLite()
    private var channelGeneration = 0
    private var demandChannel: PageChannel
    private var backgroundChannel: PageChannel?
    private let reconnect: (@Sendable () throws(TransportError) -> (demand: PageChannel, background: PageChannel))?
    private let recoveryLock = NSLockLite()
    private let stopping = Atomic<Bool>(false)
    /// How long each reconnect after a broken connection took.
    public let recoveryTimes = Locked<[UInt64]>([])
    private let shutdown: EventFD
    /// Wakes the fault thread when an APF channel is attached or detached.
    private let apfWake: EventFD
    private let completion: EventFD
    private let lastDemandPage = Atomic<Int>(-1)
    private let nextRequestID = Atomic<UInt64>(1)
    /// Requests in flight by id: a reply must match one exactly.
    private let inflight = Locked<[UInt64: PageRequest]>([:])
    private let failure = Locked<TransportError?>(nil)
    private var threads: [PThread] = []
    private let pageSize: Int
    /// Source pages per guest page (1, or 512 for 2 MiB guest pages). Every state
    /// change covers whole guest pages, so all pages of one share a state.
    private let unitPages: Int
    private var unitBytes: Int { unitPages * pageSize }
    /// A zeroed guest page to copy from where UFFDIO_ZEROPAGE does not exist (hugetlbfs).
    private let zeroUnit: MemoryMapping?
    /// Pages known zero from the zero map (never transferred).
    public let zeroPagesAtStart: Int
    public private(set) var streamStart: UInt64 = 0
    private let completedAt = Atomic<UInt64>(0)
    /// When the last page was settled (0 until then).
    public var streamEnd: UInt64 { completedAt.load(ordering: .acquiring) }

    /// Records the first completion only: a zero page the guest faults on after
    /// completion is briefly unsettled and settles again.
    private func markComplete(at t: UInt64) {
        _ = completedAt.compareExchange(expected: 0, desired: t, ordering: .acquiringAndReleasing)
        completion.signal()
    }

    /// Runs on the background thread before it streams: fetches the zero map when
    /// it was not known at start, or just waits until the source can serve pages
    /// (its guest paused) and returns none. Demand faults are served meanwhile.
    public typealias ZeroMapProvider = @Sendable () throws(TransportError) -> [ZeroMap]
    private let zeroMapProvider: ZeroMapProvider?

    public init(uffd: Userfaultfd, regions: [GuestRegion], session: SessionInfo, zeroMaps: [ZeroMap],
                zeroMapProvider: ZeroMapProvider? = nil,
                demand: PageChannel, background: PageChannel?,
                reconnect: (@Sendable () throws(TransportError) -> (demand: PageChannel, background: PageChannel))? = nil,
                config: EngineConfig, logger: Logger) throws(SystemError) {
        self.reconnect = reconnect
        self.zeroMapProvider = zeroMapProvider
        if let problem = GuestRegion.layoutProblem(regions, table: session.table) {
            throw SystemError("guest memory layout: \(problem)", errno: EINVAL)
        }
        self.uffd = uffd
        self.regions = regions.sorted { $0.sourceFirstPage < $1.sourceFirstPage }
        table = session.table
        pageSize = table.pageSize
        let guestPage = config.guestPageSize == 0 ? table.pageSize : config.guestPageSize
        guard guestPage % table.pageSize == 0, guestPage / table.pageSize <= Int(Protocol.maxPagesPerRequest) else {
            throw SystemError("guest page size \(guestPage) is not a multiple of the source page size \(table.pageSize)", errno: EINVAL)
        }
        unitPages = guestPage / table.pageSize
        for r in regions where r.base % UInt64(guestPage) != 0 || r.size % guestPage != 0 || r.sourceFirstPage % unitPages != 0 {
            throw SystemError("guest region at 0x\(String(r.base, radix: 16)) is not aligned to its \(guestPage)-byte pages", errno: EINVAL)
        }
        zeroUnit = unitPages > 1 ? try MemoryMapping.anonymous(length: guestPage) : nil
        self.config = config
        demandStall = StallWatch(timeout: config.stallTimeout)
        self.logger = logger
        demandChannel = demand
        backgroundChannel = background
        shutdown = try EventFD()
        apfWake = try EventFD()
        completion = try EventFD()
        backgroundDone = try EventFD()
        let pages = PageStates(count: session.table.totalPages)
        let firstGlobal = session.table.firstGlobalPage
        let unit = unitPages
        zeroPagesAtStart = pages.lock.withLock {
            for z in zeroMaps {
                let first = firstGlobal[Int(z.region)] + Int(z.firstPage)
                for i in 0..<Int(z.pageCount) where z.isZero(i) { pages.set(first + i, .zero) }
            }
            PostcopyEngine.keepUnitsUniform(pages, unitPages: unit)
            return pages.settled
        }
        self.pages = pages
        counters.settledPages.store(zeroPagesAtStart, ordering: .relaxed)
        counters.zeroPagesKnown.store(zeroPagesAtStart, ordering: .relaxed)
    }


    /// Starts the fault thread (and the background thread when enabled).
    public func start() {
        streamStart = nowNanoseconds()
        if pages.lock.withLock({ pages.isComplete }) { markComplete(at: streamStart) }
        threads.append(PThread(name: "uffd-fault") { [self] in guarded { () throws(TransportError) in try faultLoop() } })
        if config.background, backgroundChannel != nil {
            threads.append(PThread(name: "bg-stream", priority: config.backgroundPriority) { [self] in
                guarded { () throws(TransportError) in try backgroundLoop() }
                backgroundExited.store(true, ordering: .releasing)
                backgroundDone.signal()
            })
        } else {
            backgroundExited.store(true, ordering: .releasing)
            backgroundDone.signal()
        }
    }

    /// Signalled when the background thread has ended: every reply it asked for
    /// arrived, so its channel (the main connection) is free for control calls.
    private let backgroundDone: EventFD

    /// Waits until the background thread has ended (true) or `timeoutMs` passed.
    public func waitForBackgroundDone(timeoutMs: Int32) -> Bool {
        // The eventfd wakes the caller; the atomic orders the background thread's
        // last use of the main connection before the caller's first (an eventfd is
        // a barrier in practice, but not one ThreadSanitizer can see).
        cpc_poll1(backgroundDone.fd.raw, Int16(POLLIN), timeoutMs) > 0 && backgroundExited.load(ordering: .acquiring)
    }
    private let backgroundExited = Atomic<Bool>(false)

    /// Readable once the engine completed or failed (for a caller's poll set).
    public var completionDescriptor: Int32 { completion.fd.raw }

    /// The error that stopped the engine, if one did.
    public var failureReason: TransportError? { failure.withLock { $0 } }

    /// Blocks until every page is present (or zero) or the engine failed.
    public func waitForCompletion(tick: (() -> Void)? = nil) throws(TransportError) {
        while cpc_poll1(completion.fd.raw, Int16(POLLIN), 200) == 0 { tick?() }
        if let e = failure.withLock({ $0 }) { throw e }
    }

    /// Stops the threads (the uffd stays registered: faulting threads stay parked).
    public func stop() {
        stopping.store(true, ordering: .relaxed)
        shutdown.signal()
        for t in threads { t.join() }
        threads.removeAll()
    }

    deinit { msgs.deallocate() }

    /// Whether a uffd fault was seen for the page at `address` (for guest-side latency).
    public func pageFaulted(address: UInt64) -> Bool {
        guard let p = globalPage(address) else { return false }
        return cpc_load_u8(pages.faulted + p) != 0
    }

    private func guarded(_ body: () throws(TransportError) -> Void) {
        do { try body() } catch {
            logger.error("postcopy engine failed: \(error)")
            failure.withLock { if $0 == nil { $0 = error } }
            completion.signal()
        }
    }

    private func globalPage(_ address: UInt64) -> Int? {
        for r in regions where r.range.contains(address) {
            return r.sourceFirstPage + Int((address - r.base) / UInt64(pageSize))
        }
        return nil
    }

    /// The guest region holding global page p (regions are sorted by source page).
    private func region(ofGlobal p: Int) -> GuestRegion {
        var lo = 0, hi = regions.count - 1
        while lo < hi {
            let mid = (lo + hi + 1) / 2
            if regions[mid].sourceFirstPage <= p { lo = mid } else { hi = mid - 1 }
        }
        return regions[lo]
    }

    private func address(ofGlobal p: Int) -> UInt64 {
        let r = region(ofGlobal: p)
        return r.base + UInt64((p - r.sourceFirstPage) * pageSize)
    }

    // MARK: installing

    /// Installs pages [first, first+count) (global, one guest region) from
    /// `payload` (nil = zeros) and settles them. Only pages still in `expected`
    /// state are filled: a page the VMM removed meanwhile (UFFD_EVENT_REMOVE) is
    /// skipped, never filled from the source. EEXIST means already present (wake);
    /// EAGAIN (partial copy, or a remove pending) retries what is left after the
    /// fault thread has read the pending events.
    private func install(globalFirst first: Int, count: Int, payload: UnsafeRawBufferPointer?,
                         expected: PageStates.State, onFaultThread: Bool) throws(TransportError) {
        var i = 0
        var spins = 0
        while i < count {
            // The run of pages from i that may still be filled.
            let run: Int = pages.lock.withLock {
                while i < count, pages.state(first + i) != expected {
                    pages.forgetRemovedInflight(first + i)
                    i += 1
                }
                var n = 0
                while i + n < count, pages.state(first + i + n) == expected { n += 1 }
                return n
            }
            if run == 0 { break }
            let dst = address(ofGlobal: first + i)
            let len = run * pageSize
            let r: Userfaultfd.FillResult
            do {
                if let payload {
                    r = try uffd.copy(to: dst, from: payload.baseAddress! + i * pageSize, length: len)
                } else if let zeroUnit {
                    // hugetlbfs has no UFFDIO_ZEROPAGE: copy one zeroed guest page.
                    r = try uffd.copy(to: dst, from: zeroUnit.base, length: unitBytes)
                } else {
                    r = try uffd.zeropage(at: dst, length: len)
                }
            } catch { throw .local(error) }
            var filled = 0
            switch r {
            case .done:
                filled = payload == nil && zeroUnit != nil ? unitPages : run
            case .exists(let n):
                counters.eexist.add(1, ordering: .relaxed)
                // Pages before the present one are in; wake anyone waiting on it.
                filled = n / unitBytes * unitPages + unitPages
                uffd.wake(dst + UInt64(n / unitBytes * unitBytes), length: unitBytes)
            case .again(let n):
                counters.eagain.add(1, ordering: .relaxed)
                filled = n / unitBytes * unitPages
                if filled == 0 {
                    spins += 1
                    if spins > 1_000_000 { throw .local(SystemError("UFFDIO_COPY kept returning EAGAIN", errno: EAGAIN)) }
                    // A remove is pending: its event must be read before the
                    // kernel finishes it, and only the fault thread reads events.
                    if onFaultThread { try readEvents() } else { sched_yield() }
                }
            }
            if filled > 0 { settle(first + i, filled, onFaultThread: onFaultThread) }
            i += filled
        }
    }

    /// Marks pages present, records the service latency of faults waiting on them.
    private func settle(_ first: Int, _ count: Int, onFaultThread: Bool) {
        let recorder = onFaultThread ? latencyOnFaultThread : latencyOnBackgroundThread
        var now: UInt64 = 0
        var latencies: [UInt64] = []
        var tokens: [UInt64] = []
        let complete: Bool = pages.lock.withLock {
            // Read under the lock: another thread may have stamped a fault on
            // these pages after a clock read taken before it (a later time).
            now = nowNanoseconds()
            for p in first..<(first + count) {
                pages.set(p, .present)
                if let t0 = pages.takeWaiter(p) { latencies.append(now - min(t0, now)) }
                if !apfWaiters.isEmpty, let w = apfWaiters.removeValue(forKey: p) { tokens += w }
            }
            counters.settledPages.store(pages.settled, ordering: .relaxed)
            return pages.isComplete
        }
        for l in latencies { recorder.record(nanoseconds: l) }
        if onFaultThread { readyBatch += tokens } else { postAPFReady(tokens) }
        if complete { markComplete(at: now) }
    }

    private func handleCompletion(_ h: PageDataHeader, _ payload: UnsafeRawBufferPointer) throws(TransportError) {
        // Only pages we asked for may be installed: a peer cannot make us fill
        // (or overwrite) anything else.
        let request = inflight.withLock { $0.removeValue(forKey: h.requestID) }
        guard let request, request.region == h.region, request.pageOffset == h.pageOffset,
              request.pageCount == h.pageCount, request.pageClass == h.pageClass else {
            throw .protocolViolation("reply \(h.requestID) (pages \(h.pageOffset)..<\(h.pageOffset + UInt64(h.pageCount)) of region \(h.region)) matches no request in flight: not requested")
        }
        let first = table.firstGlobalPage[Int(h.region)] + Int(h.pageOffset)
        let count = Int(h.pageCount)
        let expected: PageStates.State = h.pageClass == .background ? .inflightBackground : .inflightDemand
        let ok = pages.lock.withLock {
            (first..<(first + count)).allSatisfy { pages.state($0) == expected || pages.wasRemovedInflight($0) }
        }
        guard ok else {
            throw .protocolViolation("pages \(h.pageOffset)..<\(h.pageOffset + UInt64(h.pageCount)) of region \(h.region) were not requested as \(h.pageClass)")
        }
        try install(globalFirst: first, count: count, payload: h.isZero ? nil : payload, expected: expected,
                    onFaultThread: h.pageClass != .background)
        if h.isZero {
            // The source found these all zero (it had no zero map yet): filled
            // with UFFDIO_ZEROPAGE, no payload crossed the wire.
            counters.zeroPagesReceived.add(UInt64(count), ordering: .relaxed)
        } else if h.pageClass == .background {
            counters.backgroundPages.add(UInt64(count), ordering: .relaxed)
        } else {
            counters.demandPages.add(UInt64(count), ordering: .relaxed)
        }
    }

    private func submit(_ channel: PageChannel, region: Int, page: Int, count: Int, class cls: PageClass) throws(TransportError) {
        let r = newRequest(region: region, page: page, count: count, class: cls)
        inflight.withLock { $0[r.requestID] = r }
        try channel.submit(r)
    }

    /// A request with the next id (not yet registered in `inflight`).
    private func newRequest(region: Int, page: Int, count: Int, class cls: PageClass) -> PageRequest {
        PageRequest(requestID: nextRequestID.wrappingAdd(1, ordering: .relaxed).oldValue, region: UInt16(region),
                    pageClass: cls, pageOffset: UInt64(page), pageCount: UInt32(count))
    }

    // MARK: fault thread

    /// For diagnosis: requests in flight by class, channel generation.
    public var debugState: String {
        let all = inflight.withLock { Array($0.values) }
        let d = all.filter { $0.pageClass != .background }.count
        return "generation \(channelLock.withLock { channelGeneration }) inflight demand \(d) background \(all.count - d) demandInFlight \(demandInFlight) deferred \(deferredDemand.count) settled \(pages.lock.withLock { pages.settled })/\(pages.count) apf-waiting \(pages.lock.withLock { apfWaiters.values.reduce(0) { $0 + $1.count } })"
    }

    private func currentChannels() -> (generation: Int, demand: PageChannel, background: PageChannel?) {
        channelLock.withLock { (channelGeneration, demandChannel, backgroundChannel) }
    }

    /// After a connection loss seen on channels of `generation`: reconnects
    /// (once, whichever thread gets here first), with backoff, until the
    /// deadline. Guest threads stay parked meanwhile; nothing is lost, since
    /// every request in flight is re-sent on the new channels by its owner.
    private func recover(from generation: Int, cause: TransportError) throws(TransportError) {
        guard cause.isConnectionLoss, let reconnect, config.recoveryDeadline > 0 else { throw cause }
        let result: Result<Void, TransportError> = recoveryLock.withLock {
            if channelLock.withLock({ channelGeneration }) > generation { return .success(()) }
            logger.warning("connection to the source lost (\(cause)); reconnecting")
            var backoff = Backoff(deadline: config.recoveryDeadline)
            let t0 = backoff.since
            while !stopping.load(ordering: .relaxed) {
                do {
                    let (d, b) = try reconnect()
                    channelLock.withLock {
                        demandChannel = d
                        backgroundChannel = b
                        channelGeneration += 1
                    }
                    let took = nowNanoseconds() - t0
                    recoveryTimes.withLock { $0.append(took) }
                    logger.warning("reconnected to the source after \(formatDuration(ns: took))")
                    return .success(())
                } catch {
                    let error = error as? TransportError ?? .closed("\(error)")
                    guard error.isConnectionLoss else { return .failure(error) }  // refused, not broken
                    if backoff.expired {
                        return .failure(.timedOut("no connection to the source for \(config.recoveryDeadline) s (last: \(error))"))
                    }
                    backoff.wait()
                }
            }
            return .failure(cause)
        }
        try result.get()
    }

    /// After a reconnect: moves `epoll`'s watch (when `watched`) from the old
    /// channel to the new one and re-sends, on it, this thread's requests still in
    /// flight (demand or background). Returns how many; a send that fails throws
    /// for the caller to recover again.
    private func switchChannel(_ epoll: Epoll, from old: PageChannel, to new: PageChannel, watched: Bool,
                               background: Bool) throws(TransportError) -> Int {
        if watched {
            epoll.remove(old.pollDescriptor)
            do { try epoll.add(new.pollDescriptor, token: 2) } catch { throw .local(error) }
        }
        let pending = inflight.withLock {
            $0.values.filter { ($0.pageClass == .background) == background }.sorted { $0.requestID < $1.requestID }
        }
        for r in pending { try new.submit(r) }
        return pending.count
    }

    private func faultLoop() throws(TransportError) {
        let epoll: Epoll
        var (generation, demand, _) = currentChannels()
        do {
            epoll = try Epoll()
            try epoll.add(uffd.fd.raw, token: 1)
            try epoll.add(demand.pollDescriptor, token: 2)
            try epoll.add(shutdown.fd.raw, token: 3)
            try epoll.add(apfWake.fd.raw, token: 4)
        } catch { throw .local(error) }
        var tokens: [UInt64] = []
        var demandAttached = true
        while true {
            if channelLock.withLock({ channelGeneration }) != generation {
                let old = demand
                (generation, demand, _) = currentChannels()
                do {
                    demandInFlight = try switchChannel(epoll, from: old, to: demand, watched: demandAttached, background: false)
                    demandStall.progressed()
                } catch {
                    try recover(from: generation, cause: error)
                    continue
                }
            }
            // Work queued before a reconnect must not wait for the next event.
            let queued = !deferredZero.isEmpty || (!deferredDemand.isEmpty && demandInFlight < Self.maxDemandInFlight)
            // A busy-polled channel (RDMA demand QP) is spun on while a READ is
            // out, and a little past the last completion: a guest that faulted
            // once usually faults again at once, and then the next fault is read
            // without a wake-up of this thread.
            if demandInFlight > 0 { lastDemandBusy = nowNanoseconds() }
            let spin = demandAttached && demand.busyPoll
                && (demandInFlight > 0 || nowNanoseconds() - lastDemandBusy < Self.demandSpinNanoseconds)
            flushReadyBatch()  // before any wait: parked guest tasks must hear of every install
            do { try epoll.wait(&tokens, timeoutMs: queued || spin ? 0 : (demandInFlight > 0 ? demandStall.pollMs : -1)) } catch { throw .local(error) }
            if tokens.contains(3) { flushReadyBatch(); return }
            do throws(TransportError) {
                if tokens.contains(1) { try readEvents() }
                if tokens.contains(4) {
                    apfWake.drain()
                    refreshAPFWatch(epoll)
                }
                if tokens.contains(5) { takeAPFRequests(at: nowNanoseconds()) }
                if demandAttached && (tokens.contains(2) || spin) {
                    let n = try demand.drainCompletions { (h, payload) throws(TransportError) in try handleCompletion(h, payload) }
                    demandInFlight -= n
                    if n > 0 { demandStall.progressed() }
                }
                try demandStall.check(inFlight: demandInFlight, "demand")
                try fillDeferredZeroPages()
                try submitDeferredDemand(demand)
            } catch {
                try recover(from: generation, cause: error)
                continue
            }
            if demandAttached, streamEnd != 0, demandInFlight == 0, deferredDemand.isEmpty {
                // Every page is in: nothing more comes from the source. The thread
                // stays to serve late faults on zero pages and REMOVE events.
                epoll.remove(demand.pollDescriptor)
                demandAttached = false
            }
        }
    }

    /// Fault-thread-only state: the uffd message buffer, demand requests waiting
    /// for room (oldest first), zero pages faulted on and not yet filled.
    private let msgs = UnsafeMutablePointer<uffd_msg>.allocate(capacity: 64)
    private var deferredZero: [Int] = []
    private var deferredDemand: [Int] = []
    private var demandInFlight = 0
    private var lastDemandBusy: UInt64 = 0
    /// When a demand reply last arrived (or the first request of a burst left).
    private var demandStall: StallWatch  // fault thread only
    /// How long the fault thread keeps polling after its last demand completion
    /// on a busy-polled channel (costs at most that much CPU per burst of faults).
    static let demandSpinNanoseconds: UInt64 = 200_000
    /// Demand requests in flight at most. Replies (a page each) must fit in the
    /// socket buffers while the fault thread is busy sending, or both sides could
    /// block on a full buffer; a guest rarely has more vCPUs faulting at once.
    static let maxDemandInFlight = 64

    private func submitDeferredDemand(_ demand: PageChannel) throws(TransportError) {
        // Out of the queue before it is sent: if the send fails, the requests
        // live on only in `inflight` and are re-sent once, after a reconnect.
        // A burst (many async faults at once) goes out in one write.
        let n = min(deferredDemand.count, Self.maxDemandInFlight - demandInFlight)
        guard n > 0 else { return }
        if demandInFlight == 0 { demandStall.progressed() }
        let batch = deferredDemand.prefix(n).map { p in
            let (region, page) = table.locate(globalPage: p)
            return newRequest(region: region, page: page, count: unitPages, class: .demand)
        }
        deferredDemand.removeFirst(n)
        demandInFlight += n
        inflight.withLock { for r in batch { $0[r.requestID] = r } }
        try demand.submit(batch: batch)
    }

    private func fillDeferredZeroPages() throws(TransportError) {
        while let p = deferredZero.popLast() {
            counters.zeroFaults.add(1, ordering: .relaxed)
            try install(globalFirst: p, count: unitPages, payload: nil, expected: .inflightDemand, onFaultThread: true)
        }
    }

    /// UFFD_EVENT_REMOVE: the VMM discarded [start, end) (MADV_DONTNEED: balloon,
    /// hot-unplug). Those pages must never again be filled from the source; touched
    /// later they read as zero. In-flight fetches for them are dropped on arrival,
    /// and threads parked on them are woken to fault again (and get a zero page).
    private func handleRemove(start: UInt64, end: UInt64) {
        var lo = start & ~UInt64(unitBytes - 1)
        var touched: [(UInt64, Int)] = []
        while lo < end {
            guard let p = globalPage(lo) else { lo += UInt64(pageSize); continue }
            let r = region(ofGlobal: p)
            let last = min(end, r.base + UInt64(r.size))
            let n = Int((last - lo + UInt64(pageSize) - 1) / UInt64(pageSize))
            pages.lock.withLock {
                for q in p..<(p + n) { pages.markRemoved(q) }
                counters.settledPages.store(pages.settled, ordering: .relaxed)
            }
            touched.append((lo, n * pageSize))
            lo += UInt64(n * pageSize)
        }
        counters.removedRanges.add(1, ordering: .relaxed)
        for (a, len) in touched { uffd.wake(a, length: len) }
        // Async waiters too: their access runs again and asks anew (a zero page).
        releaseAPFWaiters(touched.flatMap { (a, len) -> [Int] in
            guard let p = globalPage(a) else { return [] }
            return Array(stride(from: p, to: p + len / pageSize, by: unitPages))
        })
        if pages.lock.withLock({ pages.isComplete }) { markComplete(at: nowNanoseconds()) }
    }

    private func readEvents() throws(TransportError) {
        while true {
            let n: Int
            do { n = try uffd.readEvents(msgs, max: 64) } catch { throw .local(error) }
            if n == 0 { return }
            let now = nowNanoseconds()
            for i in 0..<n {
                if msgs[i].event == CPC_UFFD_EVENT_REMOVE {
                    handleRemove(start: msgs[i].arg.remove.start, end: msgs[i].arg.remove.end)
                    continue
                }
                guard msgs[i].event == CPC_UFFD_EVENT_PAGEFAULT else { continue }
                handleFault(address: msgs[i].arg.pagefault.address, at: now)
            }
        }
    }

    /// A guest touched a missing page (a uffd fault, or an async "page not
    /// present" from the APF channel): fetch it once, however many wait for it.
    private func handleFault(address: UInt64, at now: UInt64) {
        let addr = address & ~UInt64(unitBytes - 1)
        guard let p = globalPage(addr) else {
            logger.error("fault at 0x\(String(addr, radix: 16)) outside guest memory; ignored")
            return
        }
        counters.faults.add(1, ordering: .relaxed)
        enum Action { case fetch, zero, wake, wait }
        let action: Action = pages.lock.withLock {
            pages.markFaulted(p, at: now)
            switch pages.state(p) {
            case .missing:
                for q in p..<(p + unitPages) { pages.set(q, .inflightDemand) }
                return .fetch
            case .zero:
                for q in p..<(p + unitPages) { pages.set(q, .inflightDemand) }
                return .zero
            case .present:
                _ = pages.takeWaiter(p)
                return .wake
            case .inflightDemand, .inflightBackground:
                return .wait
            }
        }
        switch action {
        case .fetch:
            lastDemandPage.store(p, ordering: .relaxed)
            deferredDemand.append(p)
        case .zero:
            deferredZero.append(p)
        case .wake:
            // Installed between the fault and now; the copy already woke
            // the range, but a wake is cheap and never loses a waiter.
            uffd.wake(addr, length: unitBytes)
            releaseAPFWaiters([p])
        case .wait:
            counters.faultsCoalesced.add(1, ordering: .relaxed)
        }
    }

    // MARK: paravirtual async page faults

    /// Tokens of guest tasks parked on a page ("page not present"), by page;
    /// only touched under `pages.lock`.
    private var apfWaiters: [Int: [UInt64]] = [:]
    private let apfHooks = Locked<APFHooks?>(nil)
    private var apfWatchedFD: Int32 = -1  // fault thread only
    private var readyBatch: [UInt64] = []  // fault thread only

    /// Attaches (or, with nil, detaches) a guest's async page fault channel. The
    /// fault thread itself takes its requests (no extra thread hop on the way to
    /// a fetch); "page ready" is posted by whichever engine thread installs the page.
    public func attachAPF(_ hooks: APFHooks?) {
        apfHooks.withLock { $0 = hooks }
        apfWake.signal()
    }

    /// Fault thread: keeps the epoll watch on the attached channel's request fd.
    private func refreshAPFWatch(_ epoll: Epoll) {
        let fd = apfHooks.withLock { $0?.requestFD } ?? -1
        guard fd != apfWatchedFD else { return }
        if apfWatchedFD >= 0 { epoll.remove(apfWatchedFD) }
        apfWatchedFD = fd
        if fd >= 0 { try? epoll.add(fd, token: 5) }
    }

    /// Fault thread: "page not present (token)" requests from the guest. A page
    /// already present is ready at once; a missing one is fetched like a demand
    /// fault (once, however many wait for it); an address outside guest memory
    /// is answered as such.
    private func takeAPFRequests(at now: UInt64) {
        guard let hooks = apfHooks.withLock({ $0 }) else { return }
        var answers: [(UInt64, APFStatus)] = []
        for r in hooks.take() {
            guard let p = globalPage(r.address & ~UInt64(unitBytes - 1)) else {
                answers.append((r.token, .invalidAddress))
                continue
            }
            let presentNow: Bool = pages.lock.withLock {
                if pages.state(p) == .present { return true }
                apfWaiters[p, default: []].append(r.token)
                return false
            }
            if presentNow {
                answers.append((r.token, .ready))
            } else {
                counters.apfFaults.add(1, ordering: .relaxed)
                handleFault(address: r.address, at: now)
            }
        }
        if !answers.isEmpty { hooks.post(answers) }
    }

    /// "Page ready" for every token the fault thread released in this pass:
    /// one post (one completion-eventfd write) for a burst of installs.
    private func flushReadyBatch() {
        guard !readyBatch.isEmpty else { return }
        postAPFReady(readyBatch)
        readyBatch.removeAll(keepingCapacity: true)
    }

    private func postAPFReady(_ tokens: [UInt64]) {
        guard !tokens.isEmpty, let hooks = apfHooks.withLock({ $0 }) else { return }
        hooks.post(tokens.map { ($0, .ready) })
    }

    /// Reports ready every token waiting on these pages (now present, or removed).
    /// On the fault thread (fault, REMOVE): the tokens join this pass's batch.
    private func releaseAPFWaiters(_ ps: [Int]) {
        readyBatch += pages.lock.withLock { ps.flatMap { apfWaiters.removeValue(forKey: $0) ?? [] } }
    }

    // MARK: background thread

    /// A guest page is zero only if all its source pages are; otherwise it is
    /// fetched whole. Called with `pages.lock` held.
    private static func keepUnitsUniform(_ pages: PageStates, unitPages: Int) {
        guard unitPages > 1 else { return }
        var u = 0
        while u < pages.count {
            let end = min(u + unitPages, pages.count)
            if (u..<end).contains(where: { pages.state($0) != .zero }) {
                for p in u..<end where pages.state(p) == .zero { pages.set(p, .missing) }
            }
            u = end
        }
    }

    private func backgroundLoop() throws(TransportError) {
        var (generation, _, bg) = currentChannels()
        guard var background = bg else { return }
        if let zeroMapProvider {
            var fetched: [ZeroMap]?
            while fetched == nil {
                do { fetched = try zeroMapProvider() } catch {
                    try recover(from: generation, cause: error)
                    (generation, _, bg) = currentChannels()
                }
            }
            let maps = fetched ?? []
            let complete: Bool = pages.lock.withLock {
                for z in maps {
                    let first = table.firstGlobalPage[Int(z.region)] + Int(z.firstPage)
                    for i in 0..<Int(z.pageCount) where z.isZero(i) && pages.state(first + i) == .missing {
                        pages.set(first + i, .zero)
                    }
                }
                Self.keepUnitsUniform(pages, unitPages: unitPages)
                var zeros = 0
                for p in 0..<pages.count where pages.state(p) == .zero { zeros += 1 }
                counters.zeroPagesKnown.store(zeros, ordering: .relaxed)
                counters.settledPages.store(pages.settled, ordering: .relaxed)
                return pages.isComplete
            }
            if complete { markComplete(at: nowNanoseconds()) }
        }
        let epoll: Epoll
        do {
            epoll = try Epoll()
            try epoll.add(background.pollDescriptor, token: 2)
            try epoll.add(shutdown.fd.raw, token: 3)
        } catch { throw .local(error) }
        var cursor = 0
        var followed = -1
        var outstanding = 0
        var exhausted = false
        var tokens: [UInt64] = []
        var requestedBytes = 0
        let started = nowNanoseconds()
        var stall = StallWatch(timeout: config.stallTimeout)
        while true {
            if channelLock.withLock({ channelGeneration }) != generation {
                let old = background
                (generation, _, bg) = currentChannels()
                guard let b = bg else { return }
                background = b
                do {
                    outstanding = try switchChannel(epoll, from: old, to: background, watched: true, background: true)
                    stall.progressed()
                } catch {
                    try recover(from: generation, cause: error)
                    continue
                }
            }
            var waitMs: Int32 = -1
            do {
                while !exhausted, outstanding < (config.window ?? background.suggestedWindow ?? 4) {
                    if config.backgroundRate > 0 {
                        // Token bucket: the next batch may start once the rate allows it.
                        let allowed = Double(config.backgroundRate) * Double(nowNanoseconds() - started) / 1e9
                        let next = Double(requestedBytes + max(config.batchPages, unitPages) * pageSize)
                        if next > allowed {
                            waitMs = Int32(min(1000, ((next - allowed) / Double(config.backgroundRate) * 1000).rounded(.up)))
                            break
                        }
                    }
                    // Locality: restart the scan just after the most recent demand fault.
                    let last = lastDemandPage.load(ordering: .relaxed)
                    if last != followed {
                        followed = last
                        if last + unitPages < table.totalPages { cursor = last + unitPages }
                    }
                    guard let run = pages.lock.withLock({ () -> (Int, Int)? in
                        guard let found = pages.nextMissing(from: cursor) else { return nil }
                        let first = found / unitPages * unitPages  // whole guest pages share a state
                        let (region, page) = table.locate(globalPage: first)
                        let g = self.region(ofGlobal: first)
                        let regionEnd = min(first - page + table.pageCount(region: region), g.sourceFirstPage + g.size / pageSize)
                        var n = 0
                        let batch = max(config.batchPages / unitPages, 1) * unitPages
                        while n < batch, first + n < regionEnd, pages.state(first + n) == .missing {
                            for q in (first + n)..<(first + n + unitPages) { pages.set(q, .inflightBackground) }
                            n += unitPages
                        }
                        return (first, n)
                    }) else {
                        exhausted = true
                        break
                    }
                    cursor = run.0 + run.1
                    let (region, page) = table.locate(globalPage: run.0)
                    requestedBytes += run.1 * pageSize
                    if outstanding == 0 { stall.progressed() }
                    outstanding += 1
                    try submit(background, region: region, page: page, count: run.1, class: .background)
                }
            } catch {
                try recover(from: generation, cause: error)
                continue
            }
            if exhausted && outstanding == 0 { return }
            do { try epoll.wait(&tokens, timeoutMs: outstanding > 0 ? stall.pollMs : waitMs) } catch { throw .local(error) }
            if tokens.contains(3) { return }
            do throws(TransportError) {
                let n = try background.drainCompletions { (h, payload) throws(TransportError) in
                    try handleCompletion(h, payload)
                }
                outstanding -= n
                if n > 0 { stall.progressed() }
                try stall.check(inFlight: outstanding, "background")
            } catch {
                try recover(from: generation, cause: error)
            }
        }
    }
}
