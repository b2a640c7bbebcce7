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

/// The destination engine: a fault thread serving userfaultfd faults on the
/// demand channel, a background thread streaming the rest, one page table they
/// share. Demand always goes first: it has its own channel and its own thread,
/// and background keeps at most `window` batches in flight.
///
/// The work is spread over extensions by concern: `FaultThread.swift` (the
/// fault loop), `UffdEvents.swift` (faults, REMOVE), `BackgroundStreamer.swift`,
/// `PageInstaller.swift`, `RequestTracking.swift`, `ChannelRecovery.swift`,
/// `APFWaiters.swift`.
public final class PostcopyEngine: @unchecked Sendable {
    public let uffd: Userfaultfd
    public var regions: [GuestRegion] { map.regions }
    public let table: RegionTable
    public let counters = EngineCounters()
    /// Service latency of each demand fault (uffd message read → page installed),
    /// one recorder per installing thread (fault thread, background thread),
    /// merged when read.
    let latencyOnFaultThread: LatencyRecorder
    let latencyOnBackgroundThread: LatencyRecorder
    public var faultLatencyHistogram: Histogram<UInt64> {
        LatencyRecorder.merged([latencyOnFaultThread, latencyOnBackgroundThread])
    }
    public var faultLatency: LatencySummary { LatencySummary(faultLatencyHistogram) }
    /// The same for the faults answered by a demand request only (not those
    /// that found their page on its way: prefetched, streamed, coalesced).
    let demandLatencyOnFaultThread: LatencyRecorder
    let demandLatencyOnBackgroundThread: LatencyRecorder
    public var demandRequestLatency: LatencySummary {
        LatencySummary(LatencyRecorder.merged([demandLatencyOnFaultThread, demandLatencyOnBackgroundThread]))
    }
    /// Total time guest threads waited on faults (QEMU's blocktime, summed over vCPUs).
    public var stallNanoseconds: UInt64 { latencyOnFaultThread.totalNanoseconds + latencyOnBackgroundThread.totalNanoseconds }
    let pages: PageStates
    /// Addresses ↔ global pages.
    let map: RegionMap
    let config: EngineConfig
    let logger: Logger

    /// The current channels (see `ChannelRecovery.swift`); replaced by a reconnect.
    let channelLock = NSLockLite()
    var channels: Channels  // under channelLock
    let reconnect: Reconnector?
    let recoveryLock = NSLockLite()
    /// How long each reconnect after a broken connection took.
    public let recoveryTimes = Locked<[UInt64]>([])

    let lifecycle = Atomic<EngineLifecycle>(.created)
    let shutdown: EventFD
    /// Wakes the fault thread when an APF channel is attached or detached.
    let apfWake: EventFD
    let completion: EventFD
    /// Signalled when the background thread has ended: every reply it asked for
    /// arrived, so its channel (the main connection) is free for control calls.
    let backgroundDone: EventFD
    let backgroundExited = Atomic<Bool>(false)
    let failure = Locked<TransportError?>(nil)
    private var threads: [PThread] = []
    /// Which threads run the fault loop and the background loop (debug checks).
    let faultThread = ThreadOwner()
    let backgroundThread = ThreadOwner()
    /// State only the fault thread touches.
    var fault: FaultThreadState

    /// Where the background stream goes on from (set by the fault thread: after
    /// the most recent demand fault, or where the prefetcher says; -1: not yet).
    let backgroundFollow = Atomic<Int>(-1)
    /// Working set: recording (`EngineConfig.recordWorkingSetSeconds`), and
    /// replaying (`EngineConfig.replayWorkingSet`), see `WorkingSetEngine.swift`.
    let recorder: WorkingSetRecorder?
    private(set) var replay: WorkingSetReplay?
    let replayRefusal = Locked<String?>(nil)
    let zeroDigest: UInt64
    /// Source pages of prefetch requests claimed and not yet settled.
    let prefetchPagesInFlight = Atomic<Int>(0)
    /// Prefetch runs the fault thread hands to the background thread (`PrefetchQueue.swift`).
    let prefetchQueue = Locked<PrefetchQueue>(PrefetchQueue())
    let prefetchWake: EventFD
    /// Ids of the prefetch requests the background thread sent (it re-sends
    /// them after a reconnect, `ChannelRecovery.swift`).
    let streamPrefetch = Locked<Set<UInt64>>([])
    let nextRequestID = Atomic<UInt64>(1)
    /// Requests in flight by id: a reply must match one exactly.
    let inflight = Locked<[UInt64: PageRequest]>([:])

    /// Tokens of guest tasks parked on a page ("page not present"), by page;
    /// only touched under `pages.lock`.
    var apfWaiters: [Int: [UInt64]] = [:]
    let apfHooks = Locked<APFHooks?>(nil)

    let pageSize: Int
    /// Source pages per guest page (1, or 512 for 2 MiB guest pages). Every state
    /// change covers whole guest pages, so all pages of one share a state.
    let unitPages: Int
    var unitBytes: Int { unitPages * pageSize }
    /// The install path, resolved against the regions.
    let installer: Installer
    /// Where replies' payloads land on the continue path (set once, in init).
    private(set) var alias: AliasPlacement!
    /// Held by the background thread across one run's check, fill and settle,
    /// and by the fault thread while it applies a REMOVE: a page the VMM
    /// removed is never filled from the source after the remove is applied, and
    /// on the continue path no alias write of a removed page survives the
    /// punch (`handleRemove`). The demand path needs no lock: the fault thread
    /// applies removes itself.
    let removeGuard = NSLockLite()
    /// A zeroed guest page to copy from where UFFDIO_ZEROPAGE does not exist (hugetlbfs).
    let zeroUnit: MemoryMapping?
    /// Pages known zero from the zero map (never transferred).
    public let zeroPagesAtStart: Int
    public private(set) var streamStart: UInt64 = 0
    private let completedAt = Atomic<UInt64>(0)
    /// When the last page was settled (0 until then).
    public var streamEnd: UInt64 { completedAt.load(ordering: .acquiring) }

    let zeroMapProvider: ZeroMapProvider?

    /// The pages of precopy pass n (`Transport.fetchDirtySet`), on the
    /// background thread with nothing in flight on its channel; nil: no precopy.
    public typealias PrecopyProvider = @Sendable (UInt32) throws(TransportError) -> PrecopySet
    let precopyProvider: PrecopyProvider?
    /// Signalled when the final dirty set was applied (`PrecopyReceiver.swift`).
    let finalSetEvent: EventFD
    /// Guest memory left the userfaultfd whole after precopy (`releaseAllWhenFetched`).
    let wholeReleased = Atomic<Bool>(false)
    /// A block of streamed pages left the userfaultfd (`releaseFilledBlocks`).
    let streamReleased = Atomic<Bool>(false)

    public init(uffd: Userfaultfd, regions: [GuestRegion], session: SessionInfo, zeroMaps: [ZeroMap],
                zeroMapProvider: ZeroMapProvider? = nil, precopy: PrecopyProvider? = nil,
                demand: PageChannel, background: PageChannel?,
                reconnect: (@Sendable () throws(TransportError) -> (demand: PageChannel, background: PageChannel))? = nil,
                config: EngineConfig, logger: Logger, storage: EngineStorage? = nil) throws(SystemError) {
        self.reconnect = reconnect
        self.zeroMapProvider = zeroMapProvider
        if let problem = GuestRegion.layoutProblem(regions, table: session.table) {
            throw SystemError("guest memory layout: \(problem)", errno: EINVAL)
        }
        self.uffd = uffd
        table = session.table
        pageSize = table.pageSize
        map = RegionMap(regions, pageSize: pageSize)
        let guestPage = config.guestPageSize == 0 ? table.pageSize : config.guestPageSize
        guard guestPage % table.pageSize == 0, guestPage / table.pageSize <= Int(WireProtocol.maxPagesPerRequest) else {
            throw SystemError("guest page size \(guestPage) is not a multiple of the source page size \(table.pageSize)", errno: EINVAL)
        }
        unitPages = guestPage / table.pageSize
        for r in regions where r.base % UInt64(guestPage) != 0 || r.size % guestPage != 0 || r.sourceFirstPage % unitPages != 0 {
            throw SystemError("guest region at 0x\(String(r.base, radix: 16)) is not aligned to its \(guestPage)-byte pages", errno: EINVAL)
        }
        let installer = try Installer(config.installPath, map: map)
        self.installer = installer
        // Precopied pages wait unmapped in the alias: the continue path only,
        // and whole source pages (the final set names source pages).
        precopyProvider = Self.takesPrecopy(config, pageSize: table.pageSize) ? precopy : nil
        finalSetEvent = try EventFD()
        zeroUnit = unitPages > 1 ? try MemoryMapping.anonymous(length: guestPage) : nil
        self.config = config
        fault = FaultThreadState(stallTimeout: config.stallTimeout,
                                 prefetch: config.prefetch == .adaptive ? PrefetchState(totalPages: session.table.totalPages, unitPages: guestPage / session.table.pageSize) : nil)
        self.logger = logger
        channels = Channels(demand: demand, background: background)
        shutdown = try EventFD()
        apfWake = try EventFD()
        completion = try EventFD()
        backgroundDone = try EventFD()
        prefetchWake = try EventFD()
        // Made before the pause when the caller could (`EngineStorage`), and fresh (a new count).
        let storage = storage?.take(totalPages: session.table.totalPages) ?? EngineStorage(totalPages: session.table.totalPages)
        let pages = storage.pages
        latencyOnFaultThread = storage.latencyOnFaultThread
        latencyOnBackgroundThread = storage.latencyOnBackgroundThread
        demandLatencyOnFaultThread = storage.demandLatencyOnFaultThread
        demandLatencyOnBackgroundThread = storage.demandLatencyOnBackgroundThread
        let (table, unit) = (session.table, unitPages)
        zeroPagesAtStart = pages.lock.withLock {
            pages.applyZeroMaps(zeroMaps, table: table, unitPages: unit)
            return pages.settled
        }
        self.pages = pages
        counters.settledPages.store(zeroPagesAtStart, ordering: .relaxed)
        counters.zeroPagesKnown.store(zeroPagesAtStart, ordering: .relaxed)
        recorder = config.recordWorkingSetSeconds > 0 ? WorkingSetRecorder(seconds: config.recordWorkingSetSeconds) : nil
        zeroDigest = Self.zeroPageDigest(pageSize: session.table.pageSize)
        alias = AliasPlacement(self)
        replay = config.replayWorkingSet.flatMap { makeReplay($0) }
        placeReplies(on: [demand, background])
    }

    /// Whether an engine with `config` copies in precopy passes when the
    /// source offers them: the continue path (precopied pages wait unmapped
    /// in the alias), whole source pages (the final set names source pages),
    /// with a background thread to run the passes.
    public static func takesPrecopy(_ config: EngineConfig, pageSize: Int) -> Bool {
        guard case .continue = config.installPath else { return false }
        return (config.guestPageSize == 0 || config.guestPageSize == pageSize) && config.precopy && config.background
    }

    /// Starts the fault thread (and the background thread when enabled).
    public func start() {
        streamStart = nowNanoseconds()
        lifecycle.advance(to: .running)
        if pages.lock.withLock({ pages.isComplete }) { markComplete(at: streamStart) }
        threads.append(PThread(name: "uffd-fault") { [self] in
            faultThread.claim()
            guarded { () throws(TransportError) in try faultLoop() }
        })
        if config.background, channels.background != nil {
            threads.append(PThread(name: "bg-stream", priority: config.backgroundPriority) { [self] in
                backgroundThread.claim()
                guarded { () throws(TransportError) in try backgroundLoop() }
                backgroundEnded()
            })
        } else {
            backgroundEnded()
        }
    }

    private func backgroundEnded() {
        backgroundExited.store(true, ordering: .releasing)
        backgroundDone.signal()
    }

    /// Records the first completion only: a zero page the guest faults on after
    /// completion is briefly unsettled and settles again.
    func markComplete(at t: UInt64) {
        _ = completedAt.compareExchange(expected: 0, desired: t, ordering: .acquiringAndReleasing)
        lifecycle.advance(to: .complete)
        completion.signal()
    }

    /// Waits until the background thread has ended (true) or `timeoutMs` passed.
    public func waitForBackgroundDone(timeoutMs: Int32) -> Bool {
        // The eventfd wakes the caller; the atomic orders the background thread's
        // last use of the main connection before the caller's first (an eventfd is
        // a barrier in practice, but not one ThreadSanitizer can see).
        cpc_poll1(backgroundDone.fd.raw, Int16(POLLIN), timeoutMs) > 0 && backgroundExited.load(ordering: .acquiring)
    }

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
        lifecycle.advance(to: .stopping)
        shutdown.signal()
        for t in threads { t.join() }
        threads.removeAll()
        lifecycle.advance(to: .stopped)
    }

    /// Whether a uffd fault was seen for the page at `address` (for guest-side latency).
    public func pageFaulted(address: UInt64) -> Bool {
        guard let p = map.globalPage(address) else { return false }
        return cpc_load_u8(pages.faulted + p) != 0
    }

    /// For diagnosis: requests in flight by class, channel generation.
    public var debugState: String {
        let all = inflight.withLock { Array($0.values) }
        let d = all.filter { !$0.pageClass.isStream }.count
        return "generation \(channelLock.withLock { channels.generation }) inflight demand \(d) background \(all.count - d) demandInFlight \(fault.demandInFlight) deferred \(fault.deferredDemand.count) settled \(pages.lock.withLock { pages.settled })/\(pages.count) apf-waiting \(pages.lock.withLock { apfWaiters.values.reduce(0) { $0 + $1.count } }) state \(lifecycle.load(ordering: .relaxed))"
    }

    private func guarded(_ body: () throws(TransportError) -> Void) {
        do { try body() } catch {
            logger.error("postcopy engine failed: \(error)")
            failure.withLock { if $0 == nil { $0 = error } }
            lifecycle.advance(to: .failed)
            completion.signal()
        }
    }
}
