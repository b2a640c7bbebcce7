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

/// Where one source region lives in this process.
public struct GuestRegion: Sendable {
    public var base: UInt64
    public var size: Int
    public init(base: UInt64, size: Int) {
        self.base = base
        self.size = size
    }
    public var range: Range<UInt64> { base..<(base + UInt64(size)) }
}

/// Scheduling knobs of the engine.
public struct EngineConfig: Sendable {
    /// Stream pages the guest has not asked for (off: demand only, for benchmarks).
    public var background = true
    /// Pages per background request.
    public var batchPages = 128
    /// Background requests kept in flight at most (bounds what a demand reply can
    /// wait behind in the kernel and what the background installer holds).
    public var window = 4
    /// Background bytes per second at most (0: as fast as the window allows).
    public var backgroundRate: Int = 0
    /// Scheduling of the background thread (see `ThreadPriority` for why normal is the default).
    public var backgroundPriority: ThreadPriority = .normal
    public init() {}
}

/// Live counters, readable from another thread (progress bar).
public final class EngineCounters: Sendable {
    public let faults = Atomic<UInt64>(0)
    public let faultsCoalesced = Atomic<UInt64>(0)
    public let demandPages = Atomic<UInt64>(0)
    public let backgroundPages = Atomic<UInt64>(0)
    public let zeroFaults = Atomic<UInt64>(0)
    public let settledPages = Atomic<Int>(0)
    public let eexist = Atomic<UInt64>(0)
    public let eagain = Atomic<UInt64>(0)
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
    /// Service latency of each demand fault: uffd message read → page installed.
    public let faultLatency = LatencyRecorder()
    let pages: PageStates
    private let config: EngineConfig
    private let logger: Logger
    private let demand: PageChannel
    private let background: PageChannel?
    private let shutdown: EventFD
    private let completion: EventFD
    private let lastDemandPage = Atomic<Int>(-1)
    private let nextRequestID = Atomic<UInt64>(1)
    /// Requests in flight by id: a reply must match one exactly.
    private let inflight = Mutex<[UInt64: PageRequest]>([:])
    private let failure = Mutex<TransportError?>(nil)
    private var threads: [PThread] = []
    private let pageSize: Int
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

    public init(uffd: Userfaultfd, regions: [GuestRegion], session: SessionInfo, zeroMaps: [ZeroMap],
                demand: PageChannel, background: PageChannel?, config: EngineConfig, logger: Logger) throws(SystemError) {
        precondition(regions.count == session.table.regions.count)
        self.uffd = uffd
        self.regions = regions
        table = session.table
        pageSize = table.pageSize
        self.config = config
        self.logger = logger
        self.demand = demand
        self.background = background
        shutdown = try EventFD()
        completion = try EventFD()
        let pages = PageStates(count: session.table.totalPages)
        let firstGlobal = session.table.firstGlobalPage
        zeroPagesAtStart = pages.lock.withLock {
            for z in zeroMaps {
                let first = firstGlobal[Int(z.region)] + Int(z.firstPage)
                for i in 0..<Int(z.pageCount) where z.isZero(i) { pages.set(first + i, .zero) }
            }
            return pages.settled
        }
        self.pages = pages
        counters.settledPages.store(zeroPagesAtStart, ordering: .relaxed)
    }


    /// Starts the fault thread (and the background thread when enabled).
    public func start() {
        streamStart = nowNanoseconds()
        if pages.lock.withLock({ pages.isComplete }) { markComplete(at: streamStart) }
        threads.append(PThread(name: "uffd-fault") { [self] in guarded { () throws(TransportError) in try faultLoop() } })
        if config.background, background != nil {
            threads.append(PThread(name: "bg-stream", priority: config.backgroundPriority) { [self] in
                guarded { () throws(TransportError) in try backgroundLoop() }
            })
        }
    }

    /// Blocks until every page is present (or zero) or the engine failed.
    public func waitForCompletion(tick: (() -> Void)? = nil) throws(TransportError) {
        while cpc_poll1(completion.fd.raw, Int16(POLLIN), 200) == 0 { tick?() }
        if let e = failure.withLock({ $0 }) { throw e }
    }

    /// Stops the threads (the uffd stays registered: faulting threads stay parked).
    public func stop() {
        shutdown.signal()
        for t in threads { t.join() }
        threads.removeAll()
    }

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
        for (i, r) in regions.enumerated() where r.range.contains(address) {
            return table.firstGlobalPage[i] + Int((address - r.base) / UInt64(pageSize))
        }
        return nil
    }

    private func address(ofGlobal p: Int) -> UInt64 {
        let (region, page) = table.locate(globalPage: p)
        return regions[region].base + UInt64(page * pageSize)
    }

    // MARK: installing

    /// Installs pages [first, first+count) (global, one region) from `payload`
    /// (nil = zeros) and settles them; EEXIST means already present (wake),
    /// EAGAIN retries what is left.
    private func install(globalFirst first: Int, count: Int, payload: UnsafeRawBufferPointer?) throws(TransportError) {
        let dst = address(ofGlobal: first)
        let len = count * pageSize
        var done = 0
        var spins = 0
        while done < len {
            let r: Userfaultfd.FillResult
            do {
                if let payload {
                    r = try uffd.copy(to: dst + UInt64(done), from: payload.baseAddress! + done, length: len - done)
                } else {
                    r = try uffd.zeropage(at: dst + UInt64(done), length: len - done)
                }
            } catch { throw .system(error) }
            switch r {
            case .done:
                done = len
            case .exists(let n):
                counters.eexist.add(1, ordering: .relaxed)
                // Skip past the page that is already there; wake anyone waiting on it.
                done += n
                uffd.wake(dst + UInt64(done), length: pageSize)
                done += pageSize
            case .again(let n):
                counters.eagain.add(1, ordering: .relaxed)
                done += n
                if n == 0 {
                    spins += 1
                    if spins > 100_000 { throw .system(SystemError("UFFDIO_COPY kept returning EAGAIN", errno: EAGAIN)) }
                    sched_yield()
                }
            }
        }
        let now = nowNanoseconds()
        var latencies: [UInt64] = []
        let complete: Bool = pages.lock.withLock {
            for p in first..<(first + count) {
                pages.set(p, .present)
                if let t0 = pages.takeWaiter(p) { latencies.append(now - t0) }
            }
            counters.settledPages.store(pages.settled, ordering: .relaxed)
            return pages.isComplete
        }
        for l in latencies { faultLatency.record(nanoseconds: l) }
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
            (first..<(first + count)).allSatisfy { pages.state($0) == expected }
        }
        guard ok else {
            throw .protocolViolation("pages \(h.pageOffset)..<\(h.pageOffset + UInt64(h.pageCount)) of region \(h.region) were not requested as \(h.pageClass)")
        }
        try install(globalFirst: first, count: count, payload: h.isZero ? nil : payload)
        switch h.pageClass {
        case .background: counters.backgroundPages.add(UInt64(count), ordering: .relaxed)
        default: counters.demandPages.add(UInt64(count), ordering: .relaxed)
        }
    }

    private func submit(_ channel: PageChannel, region: Int, page: Int, count: Int, class cls: PageClass) throws(TransportError) {
        let r = PageRequest(requestID: nextRequestID.wrappingAdd(1, ordering: .relaxed).oldValue, region: UInt16(region),
                            pageClass: cls, pageOffset: UInt64(page), pageCount: UInt32(count))
        inflight.withLock { $0[r.requestID] = r }
        try channel.submit(r)
    }

    // MARK: fault thread

    private func faultLoop() throws(TransportError) {
        let epoll: Epoll
        do {
            epoll = try Epoll()
            try epoll.add(uffd.fd.raw, token: 1)
            try epoll.add(demand.pollDescriptor, token: 2)
            try epoll.add(shutdown.fd.raw, token: 3)
        } catch { throw .system(error) }
        let msgs = UnsafeMutablePointer<uffd_msg>.allocate(capacity: 64)
        defer { msgs.deallocate() }
        var tokens: [UInt64] = []
        while true {
            do { try epoll.wait(&tokens, timeoutMs: -1) } catch { throw .system(error) }
            if tokens.contains(3) { return }
            if tokens.contains(1) { try readFaults(msgs) }
            if tokens.contains(2) {
                demandInFlight -= try demand.drainCompletions { (h, payload) throws(TransportError) in try handleCompletion(h, payload) }
            }
            try submitDeferredDemand()
        }
    }

    /// Demand requests waiting for room, oldest first (fault thread only).
    private var deferredDemand: [Int] = []
    private var demandInFlight = 0
    /// Demand requests in flight at most. Replies (a page each) must fit in the
    /// socket buffers while the fault thread is busy sending, or both sides could
    /// block on a full buffer; a guest rarely has more vCPUs faulting at once.
    static let maxDemandInFlight = 64

    private func submitDeferredDemand() throws(TransportError) {
        var sent = 0
        while sent < deferredDemand.count, demandInFlight < Self.maxDemandInFlight {
            let (region, page) = table.locate(globalPage: deferredDemand[sent])
            try submit(demand, region: region, page: page, count: 1, class: .demand)
            demandInFlight += 1
            sent += 1
        }
        deferredDemand.removeFirst(sent)
    }

    private func readFaults(_ msgs: UnsafeMutablePointer<uffd_msg>) throws(TransportError) {
        while true {
            let n: Int
            do { n = try uffd.readEvents(msgs, max: 64) } catch { throw .system(error) }
            if n == 0 { return }
            let now = nowNanoseconds()
            for i in 0..<n where msgs[i].event == CPC_UFFD_EVENT_PAGEFAULT {
                let addr = msgs[i].arg.pagefault.address & ~UInt64(pageSize - 1)
                guard let p = globalPage(addr) else {
                    logger.error("fault at 0x\(String(addr, radix: 16)) outside guest memory; ignored")
                    continue
                }
                counters.faults.add(1, ordering: .relaxed)
                enum Action { case fetch, zero, wake, wait }
                let action: Action = pages.lock.withLock {
                    pages.markFaulted(p, at: now)
                    switch pages.state(p) {
                    case .missing:
                        pages.set(p, .inflightDemand)
                        return .fetch
                    case .zero:
                        pages.set(p, .inflightDemand)
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
                    counters.zeroFaults.add(1, ordering: .relaxed)
                    try install(globalFirst: p, count: 1, payload: nil)
                case .wake:
                    // Installed between the fault and now; the copy already woke
                    // the range, but a wake is cheap and never loses a waiter.
                    uffd.wake(addr, length: pageSize)
                case .wait:
                    counters.faultsCoalesced.add(1, ordering: .relaxed)
                }
            }
        }
    }

    // MARK: background thread

    private func backgroundLoop() throws(TransportError) {
        guard let background else { return }
        let epoll: Epoll
        do {
            epoll = try Epoll()
            try epoll.add(background.pollDescriptor, token: 2)
            try epoll.add(shutdown.fd.raw, token: 3)
        } catch { throw .system(error) }
        var cursor = 0
        var followed = -1
        var outstanding = 0
        var exhausted = false
        var tokens: [UInt64] = []
        var requestedBytes = 0
        let started = nowNanoseconds()
        while true {
            var waitMs: Int32 = -1
            while !exhausted, outstanding < config.window {
                if config.backgroundRate > 0 {
                    // Token bucket: the next batch may start once the rate allows it.
                    let allowed = Double(config.backgroundRate) * Double(nowNanoseconds() - started) / 1e9
                    let next = Double(requestedBytes + config.batchPages * pageSize)
                    if next > allowed {
                        waitMs = Int32(min(1000, ((next - allowed) / Double(config.backgroundRate) * 1000).rounded(.up)))
                        break
                    }
                }
                // Locality: restart the scan just after the most recent demand fault.
                let last = lastDemandPage.load(ordering: .relaxed)
                if last != followed {
                    followed = last
                    if last + 1 < table.totalPages { cursor = last + 1 }
                }
                guard let run = pages.lock.withLock({ () -> (Int, Int)? in
                    guard let first = pages.nextMissing(from: cursor) else { return nil }
                    let (region, page) = table.locate(globalPage: first)
                    let regionEnd = first - page + table.pageCount(region: region)
                    var n = 0
                    while n < config.batchPages, first + n < regionEnd, pages.state(first + n) == .missing {
                        pages.set(first + n, .inflightBackground)
                        n += 1
                    }
                    return (first, n)
                }) else {
                    exhausted = true
                    break
                }
                cursor = run.0 + run.1
                let (region, page) = table.locate(globalPage: run.0)
                try submit(background, region: region, page: page, count: run.1, class: .background)
                requestedBytes += run.1 * pageSize
                outstanding += 1
            }
            if exhausted && outstanding == 0 { return }
            do { try epoll.wait(&tokens, timeoutMs: outstanding > 0 ? -1 : waitMs) } catch { throw .system(error) }
            if tokens.contains(3) { return }
            outstanding -= try background.drainCompletions { (h, payload) throws(TransportError) in
                try handleCompletion(h, payload)
            }
        }
    }
}
