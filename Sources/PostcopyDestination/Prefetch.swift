import PostcopyTransport
import PostcopyWire

/// How the engine fetches ahead of the guest's faults.
public enum PrefetchMode: String, Sendable, CaseIterable {
    /// Only what the guest faults on; the background stream restarts after
    /// the most recent demand fault.
    case off
    /// Pages along each fault stream's trend (`PrefetchPlanner`) go out with
    /// the demand request as class `prefetch`, and the background stream
    /// follows the trend's end, or else the block with the most demand faults
    /// when one stands out (a skewed hot set), or else the last fault.
    case adaptive
}

/// The fault thread's prefetch state: the planner and per-block demand-fault counts.
struct PrefetchState {
    var planner: PrefetchPlanner
    /// Demand faults per block of `blockPages` source pages.
    var heat: [UInt16]
    var hottest = 0
    /// Demand faults counted in `heat`, and blocks with at least one.
    var heatFaults = 0
    var heatedBlocks = 0
    /// Whether one block draws far more demand faults than the average block
    /// faulted on (a skewed hot set, like zipf's head), rather than faults
    /// spread evenly (random: the stream then follows the last fault).
    var hasHotBlock: Bool {
        let h = Int(heat[hottest])
        return h >= Self.hotBlockMinFaults && h * heatedBlocks >= Self.hotBlockOverMean * heatFaults
    }
    static let hotBlockMinFaults = 8
    static let hotBlockOverMean = 4
    /// First source pages of the guest pages prefetched and not yet shown used.
    var unconfirmed: Set<Int> = []
    static let blockPages = 512

    init(totalPages: Int, unitPages: Int) {
        var limits = PrefetchPlanner.Limits()
        // Depth in guest pages: at most `maxPrefetchPagesInFlight` source pages.
        limits.maxDepth = max(1, min(limits.maxDepth, PostcopyEngine.maxPrefetchPagesInFlight / 2 / unitPages))
        limits.initialDepth = min(limits.initialDepth, limits.maxDepth)
        planner = PrefetchPlanner(pageCount: totalPages / unitPages, limits: limits)
        heat = [UInt16](repeating: 0, count: (totalPages + Self.blockPages - 1) / Self.blockPages)
    }
}

extension PostcopyEngine {
    /// Source pages of prefetch replies due at most (bounds what a later demand
    /// reply can queue behind on the demand channel).
    static let maxPrefetchPagesInFlight = 64
    /// Source pages per prefetch request at most: a demand request sent just
    /// after one waits for at most this much on the wire.
    static let maxPrefetchRequestPages = 16

    /// A fault on global page `p` was handled (`kind`: it asked for the page,
    /// waited on one in flight, or was a zero page). Plans and claims the
    /// prefetch (sent after the demand request, `submitDeferredDemand`), and
    /// tells the background stream where to go on.
    func planPrefetch(after p: Int, fetched: Bool, waited: Bool) {
        assert(faultThread.isCurrent)
        guard fault.prefetch != nil else {
            if fetched { backgroundFollow.store(p + unitPages, ordering: .relaxed) }
            return
        }
        let decision = fault.prefetch!.planner.fault(p / unitPages)
        // Prefetched pages shown used: walked past along the trend, or this one
        // (its fault waits for the prefetch reply: a late hit).
        var hits = 0
        for u in decision.walked where fault.prefetch!.unconfirmed.remove(u * unitPages) != nil { hits += 1 }
        if fault.prefetch!.unconfirmed.remove(p) != nil {
            hits += 1
            if waited { counters.prefetchLateHits.add(UInt64(unitPages), ordering: .relaxed) }
        }
        if hits > 0 { counters.prefetchHits.add(UInt64(hits * unitPages), ordering: .relaxed) }
        if fetched {
            let b = p / PrefetchState.blockPages
            let h = fault.prefetch!.heat[b]
            if h == 0 { fault.prefetch!.heatedBlocks += 1 }
            if h < UInt16.max {
                fault.prefetch!.heat[b] = h + 1
                fault.prefetch!.heatFaults += 1
            }
            if fault.prefetch!.heat[b] > fault.prefetch!.heat[fault.prefetch!.hottest], fault.prefetch!.hottest != b {
                fault.prefetch!.hottest = b
            }
        }
        guard let plan = decision.plan else {
            // No trend: the stream goes on from the block faulted on most when
            // one stands out, else after this fault (as without prefetch).
            if fetched {
                let hot = fault.prefetch!.hasHotBlock
                backgroundFollow.store(hot ? fault.prefetch!.hottest * PrefetchState.blockPages : p + unitPages, ordering: .relaxed)
            }
            return
        }
        let claimed = claimPrefetch(plan.pages.map { $0 * unitPages })
        // Along the trend: the stream continues where the prefetch ends.
        let far = (plan.start + plan.stride * plan.depth) * unitPages
        backgroundFollow.store(plan.stride > 0 ? far + unitPages : max(0, far - Self.backgroundFollowBack), ordering: .relaxed)
        guard !claimed.isEmpty else { return }
        queuePrefetch(claimed)
    }

    /// How far before a descending trend's end the stream restarts (it walks upward).
    static let backgroundFollowBack = 128

    /// Marks in flight those of `candidates` (first source pages of guest pages)
    /// still missing, within the in-flight bound; returns them ascending.
    private func claimPrefetch(_ candidates: [Int]) -> [Int] {
        let budget = Self.maxPrefetchPagesInFlight - prefetchPagesInFlight.load(ordering: .relaxed)
        var claimed: [Int] = []
        pages.lock.withLock {
            for q in candidates where (claimed.count + 1) * unitPages <= budget {
                guard q >= 0, q + unitPages <= table.totalPages, pages.state(q) == .missing else { continue }
                for x in q..<(q + unitPages) { pages.set(x, .inflightDemand) }
                claimed.append(q)
            }
        }
        for q in claimed { fault.prefetch!.unconfirmed.insert(q) }
        return claimed.sorted()
    }

    /// Requests for the claimed pages: ascending runs inside one source region
    /// and one guest region. While the background thread takes them (TCP with
    /// gathers), they go to it and leave on the background connection, ahead
    /// of its stream: a demand reply then never queues behind prefetch replies
    /// on the demand connection. Otherwise (no stream, RDMA) they go out on the
    /// demand channel behind the demand requests, `maxPrefetchRequestPages` at
    /// most per request (one guest page at least).
    private func queuePrefetch(_ claimed: [Int]) {
        let n = claimed.count * unitPages
        prefetchPagesInFlight.add(n, ordering: .relaxed)
        counters.prefetchRequestedPages.add(UInt64(n), ordering: .relaxed)
        let (taken, wake) = prefetchQueue.withLock { q -> (Bool, Bool) in
            guard q.open else { return (false, false) }
            let wake = q.runs.isEmpty
            q.runs += prefetchRuns(claimed, cap: Int(WireProtocol.maxPagesPerRequest))
            return (true, wake)
        }
        if wake { prefetchWake.signal() }
        if taken { return }
        counters.prefetchPagesOnDemandChannel.add(UInt64(n), ordering: .relaxed)
        for run in prefetchRuns(claimed, cap: max(Self.maxPrefetchRequestPages, unitPages)) {
            let (region, page) = table.locate(globalPage: run.first)
            fault.deferredPrefetch.append(newRequest(region: region, page: page, count: run.count, class: .prefetch))
        }
    }

    /// `claimed` (ascending first source pages of guest pages) as runs inside
    /// one source region and one guest region, `cap` pages at most.
    private func prefetchRuns(_ claimed: [Int], cap: Int) -> [(first: Int, count: Int)] {
        var runs: [(first: Int, count: Int)] = []
        var i = 0
        while i < claimed.count {
            let first = claimed[i]
            let (region, page) = table.locate(globalPage: first)
            let g = map.region(ofGlobal: first)
            let regionEnd = min(first - page + table.pageCount(region: region), g.sourceFirstPage + g.size / pageSize)
            var n = unitPages, j = i + 1
            while j < claimed.count, claimed[j] == first + n, first + n + unitPages <= regionEnd, n + unitPages <= cap {
                n += unitPages
                j += 1
            }
            runs.append((first, n))
            i = j
        }
        return runs
    }

    /// A prefetch reply for `count` pages was handled (installed or dropped).
    func prefetchSettled(count: Int) {
        prefetchPagesInFlight.subtract(count, ordering: .relaxed)
    }
}
