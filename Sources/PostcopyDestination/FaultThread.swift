import CPostcopy
import PostcopyCore
import PostcopyTransport
import PostcopyWire
#if canImport(Glibc)
import Glibc
#endif

/// What only the fault thread touches: the uffd message buffer, demand requests
/// waiting for room (oldest first), zero pages faulted on and not yet filled,
/// the demand channel's bookkeeping, and "page ready" tokens of this pass.
struct FaultThreadState: ~Copyable {
    /// uffd messages read per read(2).
    static let messageCapacity = 64
    let msgs = UnsafeMutablePointer<uffd_msg>.allocate(capacity: messageCapacity)
    var deferredZero: [Int] = []
    /// Clean precopied pages faulted on: mapped from the alias, no transfer.
    var deferredLocal: [(first: Int, count: Int)] = []
    var deferredDemand: [Int] = []
    /// Prefetch requests whose pages are claimed, sent after the demand requests.
    var deferredPrefetch: [PageRequest] = []
    /// The prefetcher (nil: `PrefetchMode.off`).
    var prefetch: PrefetchState?
    var demandInFlight = 0
    var lastDemandBusy: UInt64 = 0
    /// When a demand reply last arrived (or the first request of a burst left).
    var demandStall: StallWatch
    /// Whether the demand channel is watched: until every page is in and no
    /// demand reply is due (then the source has nothing more to send).
    var demandAttached = true
    /// Tokens released in this pass, posted "page ready" in one go.
    var readyBatch: [UInt64] = []
    /// The APF request fd in the epoll set (-1: none).
    var apfWatchedFD: Int32 = -1

    init(stallTimeout: Double, prefetch: PrefetchState?) {
        demandStall = StallWatch(timeout: stallTimeout)
        self.prefetch = prefetch
    }

    deinit { msgs.deallocate() }
}

extension PostcopyEngine {
    /// How long the fault thread keeps polling after its last demand completion
    /// on a busy-polled channel (costs at most that much CPU per burst of faults).
    static let demandSpinNanoseconds: UInt64 = 200_000
    /// Demand requests in flight at most. Replies (a page each) must fit in the
    /// socket buffers while the fault thread is busy sending, or both sides could
    /// block on a full buffer; a guest rarely has more vCPUs faulting at once.
    static let maxDemandInFlight = 64

    func faultLoop() throws(TransportError) {
        assert(faultThread.isCurrent)
        let epoll: Epoll
        let channels = currentChannels()
        var (generation, demand) = (channels.generation, channels.demand)
        do {
            epoll = try Epoll()
            try epoll.add(uffd.fd.raw, for: .uffd)
            try epoll.add(demand.pollDescriptor, for: .channel)
            try epoll.add(shutdown.fd.raw, for: .shutdown)
            try epoll.add(apfWake.fd.raw, for: .apfWake)
            try epoll.add(finalSetEvent.fd.raw, for: .finalSet)
        } catch { throw .local(error) }
        var tokens: [UInt64] = []
        while true {
            if channelGeneration != generation {
                let old = demand
                let now = currentChannels()
                (generation, demand) = (now.generation, now.demand)
                do {
                    fault.demandInFlight = try switchChannel(epoll, from: old, to: demand, watched: fault.demandAttached, background: false)
                    fault.demandStall.progressed()
                } catch {
                    try recoverDemand(epoll, demand, generation: generation, cause: error)
                    continue
                }
            }
            // Work queued before a reconnect must not wait for the next event.
            let queued = !fault.deferredZero.isEmpty || !fault.deferredLocal.isEmpty || ((!fault.deferredDemand.isEmpty || !fault.deferredPrefetch.isEmpty) && fault.demandInFlight < Self.maxDemandInFlight)
            // A busy-polled channel (RDMA demand QP) is spun on while a READ is
            // out, and a little past the last completion: a guest that faulted
            // once usually faults again at once, and then the next fault is read
            // without a wake-up of this thread.
            if fault.demandInFlight > 0 { fault.lastDemandBusy = nowNanoseconds() }
            let spin = fault.demandAttached && demand.busyPoll
                && (fault.demandInFlight > 0 || nowNanoseconds() - fault.lastDemandBusy < Self.demandSpinNanoseconds)
            flushReadyBatch()  // before any wait: parked guest tasks must hear of every install
            let timeoutMs: Int32 = queued || spin ? 0 : (fault.demandInFlight > 0 ? fault.demandStall.pollMs : -1)
            do { try epoll.wait(&tokens, timeoutMs: timeoutMs) } catch { throw .local(error) }
            if tokens.contains(.shutdown) { flushReadyBatch(); return }
            do throws(TransportError) {
                if tokens.contains(.uffd) { try readEvents() }
                if tokens.contains(.apfWake) {
                    apfWake.drain()
                    refreshAPFWatch(epoll)
                }
                if tokens.contains(.apfRequests) { takeAPFRequests(at: nowNanoseconds()) }
                if tokens.contains(.finalSet) {
                    finalSetEvent.drain()
                    retryParkedFaults()
                }
                if fault.demandAttached && (tokens.contains(.channel) || spin) {
                    let n = try demand.drainCompletions { (h, payload) throws(TransportError) in
                        try handleCompletion(h, payload, onFaultThread: true)
                    }
                    fault.demandInFlight -= n
                    if n > 0 { fault.demandStall.progressed() }
                }
                try fault.demandStall.check(inFlight: fault.demandInFlight, "demand")
                try fillDeferredZeroPages()
                try submitDeferredDemand(demand)
            } catch {
                try recoverDemand(epoll, demand, generation: generation, cause: error)
                continue
            }
            if fault.demandAttached, streamEnd != 0, fault.demandInFlight == 0, fault.deferredDemand.isEmpty, fault.deferredPrefetch.isEmpty {
                // Every page is in: nothing more comes from the source. The thread
                // stays to serve late faults on zero pages and REMOVE events.
                stopWatchingDemand(epoll, demand)
            }
        }
    }

    /// After a failure on the demand channel: reconnects, or, when every page
    /// is already in and the source went away, stops watching the channel
    /// (replies still due were for removed pages: none will come).
    private func recoverDemand(_ epoll: Epoll, _ demand: PageChannel, generation: Int,
                               cause: TransportError) throws(TransportError) {
        guard try recover(from: generation, cause: cause) == .sourceDone else { return }
        fault.deferredDemand.removeAll()
        fault.deferredPrefetch.removeAll()
        fault.demandInFlight = 0
        stopWatchingDemand(epoll, demand)
    }

    private func stopWatchingDemand(_ epoll: Epoll, _ demand: PageChannel) {
        guard fault.demandAttached else { return }
        epoll.remove(demand.pollDescriptor)
        fault.demandAttached = false
    }

    private func submitDeferredDemand(_ demand: PageChannel) throws(TransportError) {
        assert(faultThread.isCurrent)
        // Out of the queue before it is sent: if the send fails, the requests
        // live on only in `inflight` and are re-sent once, after a reconnect.
        // A burst (many async faults at once) goes out in one write, demand
        // requests first, then the prefetch planned with them.
        let n = min(fault.deferredDemand.count, Self.maxDemandInFlight - fault.demandInFlight)
        let m = min(fault.deferredPrefetch.count, Self.maxDemandInFlight - fault.demandInFlight - n)
        guard n + m > 0 else { return }
        if config.testDelayBeforeDemandMicroseconds > 0 { usleep(config.testDelayBeforeDemandMicroseconds) }
        if fault.demandInFlight == 0 { fault.demandStall.progressed() }
        let batch = fault.deferredDemand.prefix(n).map { p in
            let (region, page) = table.locate(globalPage: p)
            return newRequest(region: region, page: page, count: unitPages, class: .demand)
        } + fault.deferredPrefetch.prefix(m)
        fault.deferredDemand.removeFirst(n)
        fault.deferredPrefetch.removeFirst(m)
        fault.demandInFlight += n + m
        inflight.withLock { for r in batch { $0[r.requestID] = r } }
        try demand.submit(batch: batch)
    }

    private func fillDeferredZeroPages() throws(TransportError) {
        assert(faultThread.isCurrent)
        while let (p, n) = fault.deferredLocal.popLast() {
            counters.cleanPageFaults.add(1, ordering: .relaxed)
            counters.cleanPagesMapped.add(UInt64(n), ordering: .relaxed)
            try install(globalFirst: p, count: n, payload: aliasBuffer(globalFirst: p, count: n),
                        expected: .inflightDemand, onFaultThread: true)
        }
        while let p = fault.deferredZero.popLast() {
            counters.zeroFaults.add(1, ordering: .relaxed)
            try install(globalFirst: p, count: unitPages, payload: nil, expected: .inflightDemand, onFaultThread: true)
        }
    }
}
