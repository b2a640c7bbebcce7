import PostcopyCore
import PostcopyTransport
import PostcopyWire

/// The background thread: streams the pages no guest asked for, after the
/// most recent demand fault first (locality), with at most `window` batches in
/// flight and at most `backgroundRate` bytes per second.
extension PostcopyEngine {
    /// How many requests a batch's worth of window may become when zero pages
    /// cut the missing pages into short runs (TCP).
    static let shortRunsPerBatch = 32

    func backgroundLoop() throws(TransportError) {
        assert(backgroundThread.isCurrent)
        let channels = currentChannels()
        var generation = channels.generation
        guard var background = channels.background else { return }
        guard try precopyPhase(generation: &generation, background: &background) else { return }
        // After precopy the missing pages are the stale ones (a zero map would
        // only delay them, and make the source scan RAM while the guest
        // starts), unless precopy stopped early.
        let precopied = precopyProvider != nil && pages.lock.withLock { pages.missing < pages.count / 8 }
        var zeroChunks: ZeroMapChunks?
        if let zeroMapProvider, !precopied {
            guard try waitForSource(zeroMapProvider, generation: &generation, background: &background) else { return }
            if zeroMapProvider.fetch != nil { zeroChunks = ZeroMapChunks(table: table, unitPages: unitPages) }
        }
        guard holdWhileRecording() else { return }
        let epoll: Epoll
        do {
            epoll = try Epoll()
            try epoll.add(background.pollDescriptor, for: .channel)
            try epoll.add(shutdown.fd.raw, for: .shutdown)
            try epoll.add(prefetchWake.fd.raw, for: .prefetch)
        } catch { throw .local(error) }
        // From here on the prefetch planned on faults leaves on this channel
        // (where it gathers), ahead of the stream; until this thread ends. Not
        // on the copy path: there every background UFFDIO_COPY widens a race
        // with REMOVE (README, "VMM handoff"), so the fault thread installs
        // its prefetch itself, as before.
        if config.prefetch == .adaptive, background.canGather, !isCopy { prefetchQueue.withLock { $0.open = true } }
        defer { prefetchQueue.withLock { $0.open = false } }
        var cursor = 0
        var followed = -1
        var outstanding = 0
        // The window counts pages as well as requests: where zero pages cut the
        // missing pages into short runs, more (smaller) requests are in flight,
        // so that the stream keeps its bytes in flight. A transport that bounds
        // its requests itself (RDMA: the send queue) keeps its window in requests.
        var outstandingPages = 0
        var zeroCursor = config.installZeroPagesAhead ? 0 : table.totalPages
        // Precopied clean pages are mapped first: no transfer, and each would be a fault.
        var cleanCursor = precopyProvider == nil ? table.totalPages : 0
        var releaseAllPending = pages.lock.withLock { pages.releaseAllPending }
        var nextHeldCheck: UInt64 = 0
        var exhausted = false
        // Until every page of a replayed working set was requested.
        var replayPending = replay != nil
        var tokens: [UInt64] = []
        var bucket = TokenBucket(bytesPerSecond: config.backgroundRate)
        let batchBytes = max(config.batchPages, unitPages) * pageSize
        var stall = StallWatch(timeout: config.stallTimeout)
        /// What every submission (a run, or a gather of runs) costs the window,
        /// the rate limit and the stall watch.
        func submitting(requests: Int, pages: Int) {
            bucket.spend(pages * pageSize)
            if outstanding == 0 { stall.progressed() }
            outstanding += requests
            outstandingPages += pages
        }
        while true {
            if channelGeneration != generation {
                let old = background
                let now = currentChannels()
                generation = now.generation
                guard let b = now.background else { return }
                background = b
                do {
                    outstanding = try switchChannel(epoll, from: old, to: background, watched: true, background: true)
                    outstandingPages = inflightPages(background: true)
                    stall.progressed()
                } catch {
                    if try recover(from: generation, cause: error) == .sourceDone { return }
                    continue
                }
            }
            var waitMs: Int32 = -1
            do {
                let prefetched = try submitQueuedPrefetch(background)
                if prefetched.requests > 0 { submitting(requests: prefetched.requests, pages: prefetched.pages) }
                let window = config.window ?? background.suggestedWindow ?? 4
                let requestLimit = background.suggestedWindow == nil ? window * Self.shortRunsPerBatch : window
                let pagesWindow = window * batchBytes / pageSize
                claiming: while !exhausted, outstandingPages < (background.canGather ? max(Self.replayWindowPages, pagesWindow) : pagesWindow) {
                    if let delay = bucket.delayMs(before: batchBytes) {
                        // Nothing left to claim: the stream is over, whatever its budget says.
                        if !replayPending, pages.lock.withLock({ pages.missing == 0 }) { exhausted = true }
                        waitMs = delay
                        break
                    }
                    // A working set being replayed goes first, in gathers where
                    // the channel can (one request each, so the pages bound them).
                    if background.canGather, replayPending, let runs = claimReplayGather() {
                        submitting(requests: runs.count, pages: runs.reduce(0) { $0 + $1.count })
                        try submitGather(background, runs: runs)
                        continue
                    }
                    // Gathers are bounded by pages (their runs by the wire's maximum).
                    guard background.canGather || outstanding < requestLimit else { break }
                    // Locality: restart the scan just after the most recent demand
                    // fault, or where the prefetcher says (`planPrefetch`).
                    let follow = backgroundFollow.load(ordering: .relaxed)
                    if follow != followed {
                        followed = follow
                        if follow >= 0, follow < table.totalPages { cursor = follow }
                    }
                    // (In address order where it cannot.)
                    let replayed = replayPending ? claimReplayRun() : nil
                    if replayed == nil { replayPending = false }
                    // Only where the zero map is known (fetched here as the stream gets there).
                    var upTo = Int.max
                    if replayed == nil, zeroChunks != nil {
                        switch try zeroMapSpan(from: cursor, &zeroChunks!, zeroCursor: &zeroCursor, channelIdle: outstanding == 0) {
                        case .span(let first, let end): (cursor, upTo) = (first, end)
                        case .waitForIdle: break claiming
                        case .noneMissing:
                            exhausted = true
                            break claiming
                        }
                    }
                    // Where the channel can: runs of missing pages, scattered or
                    // not, a batch of them per gather (`claimBackgroundGather`).
                    if replayed == nil, background.canGather {
                        guard let runs = claimBackgroundGather(from: cursor, upTo: upTo) else {
                            if upTo < .max { cursor = upTo % table.totalPages; continue }
                            exhausted = true
                            break
                        }
                        cursor = runs[runs.count - 1].first + runs[runs.count - 1].count
                        submitting(requests: runs.count, pages: runs.reduce(0) { $0 + $1.count })
                        try submitGather(background, runs: runs)
                        continue
                    }
                    guard let run = replayed ?? claimBackgroundRun(from: cursor, upTo: upTo) else {
                        if upTo < .max { cursor = upTo % table.totalPages; continue }
                        exhausted = true
                        break
                    }
                    if replayed == nil { cursor = run.first + run.count }
                    let (region, page) = table.locate(globalPage: run.first)
                    submitting(requests: 1, pages: run.count)
                    try submit(background, region: region, page: page, count: run.count, class: .background)
                }
            } catch {
                if try recover(from: generation, cause: error) == .sourceDone { return }
                continue
            }
            // While the first requests are on the wire (after precopy): the long clean runs leave the userfaultfd.
            if pages.lock.withLock({ () -> Bool in defer { pages.releaseRunsPending = false }; return pages.releaseRunsPending }) {
                releaseCleanRuns()
            }
            // While the requests are on the wire: map a share of the zero pages
            // before the guest touches them (each would be a fault); once a
            // replayed working set is all requested (its pages are the ones
            // the guest wants first: measured on 1 GiB kv restores, mapping
            // 58k zero pages ahead took the first 50 ms of the replay).
            var zeroWork = false
            if zeroCursor < table.totalPages || cleanCursor < table.totalPages, !replayPending {
                do throws(TransportError) {
                    var clean = false, zero = false
                    if cleanCursor < table.totalPages, !releaseAllPending {
                        clean = try installAhead(.clean, from: &cleanCursor, budget: Self.cleanPagesAheadPerRound)
                    }
                    if zeroCursor < table.totalPages { zero = try installAhead(.zero, from: &zeroCursor, budget: Self.zeroPagesAheadPerRound) }
                    zeroWork = clean || zero
                } catch {
                    if try recover(from: generation, cause: error) == .sourceDone { return }
                    continue
                }
            }
            // After a small final dirty set: everything at once, as soon as it can be.
            if releaseAllPending, outstanding == 0 { releaseAllPending = !releaseAllWhenFetched() }
            // Held streamed pages: their blocks leave the userfaultfd once full (every 2 ms at most).
            if holdsStreamedPages, nowNanoseconds() >= nextHeldCheck {
                nextHeldCheck = nowNanoseconds() + 2_000_000
                _ = releaseFilledBlocks()
            }
            if exhausted && outstanding == 0 && !zeroWork && !releaseAllPending {
                if finishHeldBlocks(cleanCursor: &cleanCursor) { continue }
                if closePrefetchQueueIfEmpty() { return }
                continue
            }
            let timeout = zeroWork ? 0 : (outstanding > 0 ? stall.pollMs : (releaseAllPending ? 1 : waitMs))
            do { try epoll.wait(&tokens, timeoutMs: timeout) } catch { throw .local(error) }
            if tokens.contains(.shutdown) { return }
            if tokens.contains(.prefetch) { prefetchWake.drain() }
            do throws(TransportError) {
                let n = try background.drainCompletions { (h, payload) throws(TransportError) in
                    outstandingPages -= Int(h.pageCount)
                    try handleCompletion(h, payload, onFaultThread: false)
                }
                outstanding -= n
                if n > 0 { stall.progressed() }
                try stall.check(inFlight: outstanding, "background")
            } catch {
                if try recover(from: generation, cause: error) == .sourceDone { return }
            }
        }
    }

    /// Maps up to `budget` pages in `state` from `cursor` on, so that the
    /// guest's first touch of them is no fault: zero pages (the zero map),
    /// installed as a zero reply would be (UFFDIO_ZEROPAGE; on the continue
    /// path zeros written through the alias, then UFFDIO_CONTINUE), or clean
    /// precopied pages (UFFDIO_CONTINUE of what the alias holds). Claimed like
    /// a background run; a page removed or faulted meanwhile follows the same
    /// rules as for a reply. Returns whether such pages may be left.
    private func installAhead(_ state: PageStates.State, from cursor: inout Int, budget: Int) throws(TransportError) -> Bool {
        assert(backgroundThread.isCurrent)
        var budget = budget
        while budget > 0 {
            let run: (first: Int, count: Int)? = pages.lock.withLock {
                guard let found = pages.next(state, from: cursor) else { return nil }
                let first = found / unitPages * unitPages
                let g = map.region(ofGlobal: first)
                let regionEnd = g.sourceFirstPage + g.size / pageSize
                var n = 0
                while n < budget, first + n < regionEnd,
                      (first + n..<first + n + unitPages).allSatisfy({ pages.state($0) == state }) {
                    for q in (first + n)..<(first + n + unitPages) { pages.set(q, .inflightBackground) }
                    n += unitPages
                }
                return (first, n)
            }
            guard let run else {
                cursor = table.totalPages
                return false
            }
            // A unit that is only partly zero stays for its reply or its fault.
            cursor = run.first + max(run.count, unitPages)
            guard run.count > 0 else { continue }
            if state == .clean {
                try install(globalFirst: run.first, count: run.count, payload: aliasBuffer(globalFirst: run.first, count: run.count),
                            expected: .inflightBackground, onFaultThread: false)
                counters.cleanPagesMapped.add(UInt64(run.count), ordering: .relaxed)
            } else {
                // Held where the alias reads zero already (`holdZeros`); the rest written as zeros and mapped.
                if !holdsStreamedPages || holdZeros(globalFirst: run.first, count: run.count) < run.count {
                    try install(globalFirst: run.first, count: run.count, payload: nil, expected: .inflightBackground, onFaultThread: false)
                }
                counters.zeroPagesAhead.add(UInt64(run.count), ordering: .relaxed)
            }
            budget -= run.count
        }
        return true
    }

    /// Zero pages mapped ahead between two looks at the background channel.
    static let zeroPagesAheadPerRound = 2048
    /// Clean precopied pages mapped between two looks (cheaper: no zeroing).
    static let cleanPagesAheadPerRound = 8192

    /// Claims (marks in flight) the next run of missing pages at or after
    /// `cursor`: whole guest pages, inside one source region and one guest
    /// region, at most a batch (and `limit`, rounded down to whole guest pages but
    /// at least one). Nil when no page is missing; with `upTo`, when none is
    /// missing in [cursor, upTo) (the run ends before `upTo`).
    func claimBackgroundRun(from cursor: Int, limit: Int = .max, upTo: Int = .max) -> (first: Int, count: Int)? {
        assert(backgroundThread.isCurrent)
        return pages.lock.withLock { () -> (first: Int, count: Int)? in
            guard let found = pages.nextMissing(from: cursor) else { return nil }
            if upTo != .max, found < cursor || found >= upTo { return nil }
            let first = found / unitPages * unitPages  // whole guest pages share a state
            let (region, page) = table.locate(globalPage: first)
            let g = map.region(ofGlobal: first)
            let regionEnd = min(first - page + table.pageCount(region: region), g.sourceFirstPage + g.size / pageSize)
            var n = 0
            let batch = max(min(config.batchPages, limit) / unitPages, 1) * unitPages
            while n < batch, first + n < min(regionEnd, upTo), pages.state(first + n) == .missing {
                for q in (first + n)..<(first + n + unitPages) { pages.set(q, .inflightBackground) }
                n += unitPages
            }
            return (first, n)
        }
    }
}
