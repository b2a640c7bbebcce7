import CPostcopy
import PostcopyCore
import PostcopyTransport
import PostcopyWire

/// Precopy at the destination (hybrid migration): before streaming, the
/// background thread copies the pages of each pass the source hands out into
/// the alias of shared guest memory, *without mapping them* (`.staged`). The
/// guest cannot see a staged page: it is not in its page tables, and a fault
/// on it waits (`parkedOnFinalSet`). Once the source guest paused, the final
/// dirty set names every page written since it was copied: those go back to
/// `.missing` (fetched again, after the pause), all others become `.clean` and
/// are mapped by `UFFDIO_CONTINUE` with no transfer, ahead of the guest or at
/// its first touch. So a page the source wrote after sending it is never
/// visible: only bytes read after the pause, or read after the last write
/// before it, are ever mapped.
///
/// The precopied pages live in the guest's own memory file (allocated before
/// the switchover anyway): no memory outside guest RAM. Anonymous guest memory
/// (the copy path) has no such place, so it gets no precopy: staging would
/// cost as much memory as the guest has, and pages installed by UFFDIO_COPY
/// cannot be taken back by this process.
extension PostcopyEngine {
    /// Runs the passes until the final dirty set is applied. False when the
    /// source went away after every page was in. A broken connection ends
    /// precopy (every staged page is dropped: fetched again after the pause).
    func precopyPhase(generation: inout Int, background: inout PageChannel) throws(TransportError) -> Bool {
        assert(backgroundThread.isCurrent)
        guard let provider = precopyProvider else { return true }
        var pass: UInt32 = 1
        do {
            while true {
                let set = try provider(pass)
                if set.isFinal {
                    counters.finalSetReceivedAt.store(nowNanoseconds(), ordering: .relaxed)
                    applyFinalSet(set)
                    logger.info("precopy: final dirty set of \(set.pageCount) pages after \(pass - 1) pass(es): \(set.decision)")
                    return true
                }
                guard try copyPass(set, background) else { return true }  // stopping
                counters.precopyPasses.add(1, ordering: .relaxed)
                pass += 1
            }
        } catch {
            switch error {
            case .unavailable, .peer:
                // The source cannot (or will not) precopy to us: postcopy does it all.
                logger.warning("precopy: \(error); postcopy only")
            default:
                if error.isConnectionLoss { logger.warning("precopy: \(error); dropping what was precopied, postcopy only") }
                // Anything but a lost connection (a malformed or out-of-order
                // set, a reply nobody asked for) fails the session: nothing
                // staged was ever mapped.
                guard error.isConnectionLoss else { throw error }
                if try recover(from: generation, cause: error) == .sourceDone { return false }
                let now = currentChannels()
                generation = now.generation
                guard let b = now.background else { return false }
                background = b
            }
            dropPrecopy()
            return true
        }
    }

    /// Copies the pages of `set` still to copy (missing or staged), at most a
    /// window in flight, until done or the source reports its guest paused
    /// (then only what is in flight is waited for). False on shutdown.
    private func copyPass(_ set: PrecopySet, _ channel: PageChannel) throws(TransportError) -> Bool {
        let epoll: Epoll
        do {
            epoll = try Epoll()
            try epoll.add(channel.pollDescriptor, for: .channel)
            try epoll.add(shutdown.fd.raw, for: .shutdown)
        } catch { throw .local(error) }
        let window = config.window ?? channel.suggestedWindow ?? 4
        let requestLimit = channel.suggestedWindow == nil ? window * Self.shortRunsPerBatch : window
        let pageLimit = window * config.batchPages
        var (run, page) = (0, set.runs.first?.lowerBound ?? 0)
        var outstanding = 0, outstandingPages = 0
        var paused = false
        var stall = StallWatch(timeout: config.stallTimeout)
        var tokens: [UInt64] = []
        // Where the source gathers precopy runs: a batch of runs per request,
        // bounded by pages only (later passes' pages are scattered).
        let gathers = channel.canGatherPrecopy
        let gatherPageLimit = max(Self.replayWindowPages, pageLimit)
        while true {
            while !paused, gathers || outstanding < requestLimit, outstandingPages < (gathers ? gatherPageLimit : pageLimit) {
                if gathers {
                    guard let runs = claimPrecopyGather(set, run: &run, page: &page) else { break }
                    if outstanding == 0 { stall.progressed() }
                    outstanding += runs.count
                    outstandingPages += runs.reduce(0) { $0 + $1.count }
                    try submitGather(channel, runs: runs, class: .precopy)
                    continue
                }
                guard let r = claimPrecopyRun(set, run: &run, page: &page) else { break }
                let (region, p) = table.locate(globalPage: r.first)
                if outstanding == 0 { stall.progressed() }
                outstanding += 1
                outstandingPages += r.count
                try submit(channel, region: region, page: p, count: r.count, class: .precopy)
            }
            if outstanding == 0 { return true }
            do { try epoll.wait(&tokens, timeoutMs: stall.pollMs) } catch { throw .local(error) }
            if tokens.contains(.shutdown) { return false }
            let n = try channel.drainCompletions { (h, payload) throws(TransportError) in
                if h.sourcePaused { paused = true }
                outstandingPages -= Int(h.pageCount)
                try handleCompletion(h, payload, onFaultThread: false)
            }
            outstanding -= n
            if n > 0 { stall.progressed() }
            try stall.check(inFlight: outstanding, "precopy")
        }
    }

    /// Claims the next run of `set` (from `run`/`page`) of pages still to
    /// copy: missing, or staged by an earlier pass (then written again). At
    /// most a batch (and `maxPages`), inside one region. Nil when the set is done.
    private func claimPrecopyRun(_ set: PrecopySet, run: inout Int, page: inout Int, maxPages: Int = .max) -> (first: Int, count: Int)? {
        pages.lock.withLock { () -> (first: Int, count: Int)? in
            while run < set.runs.count {
                let r = set.runs[run]
                if page < r.lowerBound { page = r.lowerBound }
                while page < r.upperBound, page < pages.count, !Self.copiesInPrecopy(pages.state(page)) { page += 1 }
                guard page < r.upperBound, page < pages.count else {
                    run += 1
                    continue
                }
                let first = page
                let (region, p) = table.locate(globalPage: first)
                let g = map.region(ofGlobal: first)
                let limit = min(first - p + table.pageCount(region: region), g.sourceFirstPage + g.size / pageSize, first + min(config.batchPages, maxPages))
                while true {
                    let end = min(set.runs[run].upperBound, limit)
                    while page < end, Self.copiesInPrecopy(pages.state(page)) {
                        pages.set(page, .inflightPrecopy)
                        page += 1
                    }
                    // A short gap of staged pages before the next run is
                    // fetched too (once more, harmless): one request instead
                    // of two, where later passes' pages are scattered.
                    guard page == set.runs[run].upperBound, run + 1 < set.runs.count else { break }
                    let next = set.runs[run + 1].lowerBound
                    guard next - page <= Self.precopyGapPages, next < limit,
                          (page..<next).allSatisfy({ pages.state($0) == .staged }) else { break }
                    for q in page..<next { pages.set(q, .inflightPrecopy) }
                    page = next
                    run += 1
                }
                return (first, page - first)
            }
            return nil
        }
    }

    /// Claims runs of `set` still to copy for one gather: up to a batch of
    /// pages or `WireProtocol.maxGatherRuns` runs. Nil when the set is done.
    private func claimPrecopyGather(_ set: PrecopySet, run: inout Int, page: inout Int) -> [(first: Int, count: Int)]? {
        var (r, p) = (run, page)
        defer { (run, page) = (r, p) }
        return gatherRuns(batch: config.batchPages) { left in claimPrecopyRun(set, run: &r, page: &p, maxPages: left) }
    }

    private static func copiesInPrecopy(_ s: PageStates.State) -> Bool { s == .missing || s == .staged }

    /// Staged pages fetched again to join two runs of a pass into one request.
    static let precopyGapPages = 8

    /// A precopy reply: its bytes into the alias (received there in place, or
    /// copied; zeros for a zero reply), the pages staged, not mapped. A page
    /// the VMM removed meanwhile is zero instead (its reply may have landed
    /// after the punch: zeroed again).
    func stage(globalFirst first: Int, count: Int, payload: UnsafeRawBufferPointer?) {
        assert(backgroundThread.isCurrent)
        removeGuard.withLock {
            let alias = aliasBuffer(globalFirst: first, count: count)
            let dst = UnsafeMutableRawPointer(mutating: alias.baseAddress!)
            if let payload, payload.count == alias.count {
                if payload.baseAddress != alias.baseAddress { dst.copyMemory(from: payload.baseAddress!, byteCount: alias.count) }
            } else if cpc_is_zero(dst, alias.count) == 0 {
                // Zero pages cost only a look when the file holds zeros already (a fresh one).
                dst.initializeMemory(as: UInt8.self, repeating: 0, count: alias.count)
            }
            pages.lock.withLock {
                for p in first..<(first + count) {
                    if pages.wasRemovedInflight(p) {
                        pages.forgetRemovedInflight(p)
                        (dst + (p - first) * pageSize).initializeMemory(as: UInt8.self, repeating: 0, count: pageSize)
                        pages.set(p, .zero)
                    } else {
                        pages.set(p, .staged)
                    }
                }
            }
        }
        counters.precopyPages.add(UInt64(count), ordering: .relaxed)
    }

    /// The final dirty set: its staged pages are stale (missing again), every
    /// other staged page is clean. Faults parked meanwhile go on, and long
    /// runs of clean pages leave the userfaultfd (`releaseCleanRuns`) as soon
    /// as the first requests for the stale pages are out: the guest's hot
    /// pages are among those, and the releases take 1-13 ms at 1 GiB.
    /// Measured at 1 GiB (zipf, 160-290 stale pages, 3-4 runs each): releasing
    /// the clean runs at once cut the summed vCPU stall after the switch from
    /// 37-97 ms (waiting for the stale pages before releasing anything) to
    /// 23-34 ms; mapping every clean page ahead by CONTINUE instead took
    /// 65 ms of the daemon's CPU with the vCPUs stalled meanwhile (82-90 ms).
    func applyFinalSet(_ set: PrecopySet) {
        var stale = 0
        removeGuard.withLock {
            pages.lock.withLock {
                for r in set.runs {
                    for p in r where p < pages.count && pages.state(p) == .staged {
                        pages.set(p, .missing)
                        stale += 1
                    }
                }
                // In runs, one write each: at 8 GiB this runs while the guest resumes.
                var p = 0
                while let s = pages.next(.staged, from: p) {
                    let n = pages.runLength(from: s, in: .staged, end: pages.count)
                    _ = pages.setRun(s, n, to: .clean)
                    p = s + n
                }
            }
        }
        counters.precopyStalePages.store(UInt64(stale), ordering: .relaxed)
        // The faults parked on the final set go on at once (the fault thread),
        // while the long clean runs leave the userfaultfd here.
        counters.finalSetAppliedAt.store(nowNanoseconds(), ordering: .relaxed)
        finalSetEvent.signal()
        pages.lock.withLock { pages.releaseRunsPending = true }
        if stale <= Self.wholeReleaseStalePages {
            // Few stale pages: once they are fetched again, the rest (short
            // clean runs) is released too, and the regions whole again.
            pages.lock.withLock { pages.releaseAllPending = true }
            _ = releaseAllWhenFetched()
        }
    }

    /// Precopy ended without a final set: nothing staged is trusted.
    private func dropPrecopy() {
        pages.lock.withLock {
            var p = 0
            while let s = pages.next(.staged, from: p) {
                pages.set(s, .missing)
                p = s + 1
            }
            var q = 0
            while let s = pages.next(.inflightPrecopy, from: q) {
                pages.set(s, .missing)
                q = s + 1
            }
        }
        inflight.withLock { $0 = $0.filter { $0.value.pageClass != .precopy } }
        counters.finalSetAppliedAt.store(nowNanoseconds(), ordering: .relaxed)
        finalSetEvent.signal()
    }

    /// Fault thread: the faults parked on precopied pages, handled again now
    /// that those pages are clean (mapped from the alias) or missing (fetched).
    func retryParkedFaults() {
        assert(faultThread.isCurrent)
        let parked: [UInt64] = pages.lock.withLock {
            let p = pages.parkedOnFinalSet
            pages.parkedOnFinalSet = []
            return p
        }
        // The first-fault time stays the one recorded when the fault came.
        for address in parked { handleFault(address: address, at: nowNanoseconds(), again: true) }
    }

    /// The alias bytes of pages [first, first+count) (one guest region; continue path).
    func aliasBuffer(globalFirst first: Int, count: Int) -> UnsafeRawBufferPointer {
        guard case .continue(let deltas, _) = installer else { preconditionFailure("alias of the copy path") }
        let a = map.address(ofGlobal: first) &+ deltas[map.regionIndex(ofGlobal: first)]
        return UnsafeRawBufferPointer(start: UnsafeRawPointer(bitPattern: UInt(a)), count: count * pageSize)
    }
}
