/// Decides, from the demand faults alone, which pages to fetch before the
/// guest touches them (Leap, USENIX ATC'20: a majority vote over the recent
/// fault strides, a prefetch depth that grows with hits and shrinks to 0 on
/// misses). Pure logic, no I/O: the engine feeds it every fault (in guest
/// pages, `unitPages` source pages each) and fetches what it returns.
///
/// Better than one global vote: faults are split into *streams* by address
/// proximity (like a CPU's stream prefetcher, or Linux readahead per file), so
/// vCPUs scanning different parts of memory at once do not hide each other's
/// trend, and userfaultfd needs no thread ids (Firecracker does not ask for them).
///
/// Hits are known only from what faults show, as userfaultfd says nothing of
/// the touches of a page once it is mapped: the planner reports the window
/// positions a stream walked past along its trend (`Decision.walked`), and the
/// engine counts those it had prefetched, and those a fault waited on in flight.
public struct PrefetchPlanner: Sendable {
    public struct Limits: Sendable {
        /// Deltas each stream votes over.
        public var history = 8
        /// Streams tracked at once (least recently faulted replaced).
        public var streams = 8
        /// Depth of a new trend, and the most any stream may reach (guest pages).
        public var initialDepth = 8
        public var maxDepth = 64
        /// Largest stride (guest pages) still taken as a trend: beyond it, the
        /// faults are as good as random for prefetching.
        public var maxStride = 64
        /// A fault this close (guest pages) to a stream's last one belongs to it
        /// (besides the stream's own prefetch reach).
        public var near = 32
        public init() {}
    }

    /// What to fetch for one fault: pages `page + stride * i`, i in 1...depth.
    public struct Plan: Equatable, Sendable {
        public var stride: Int
        public var depth: Int
        public var start: Int
        public var pages: [Int] { depth > 0 ? (1...depth).map { start + stride * $0 } : [] }
    }

    struct Stream {
        var last: Int
        var deltas: [Int] = []
        var depth = 0
        /// The window prefetched at the last planned fault, waiting for evidence.
        var pending: (start: Int, stride: Int, depth: Int)?
        var lastUse: UInt64
    }

    /// The answer to one fault: what to prefetch, and the positions of the
    /// stream's previous window it walked past (used, if they were prefetched).
    public struct Decision: Equatable, Sendable {
        public var plan: Plan?
        public var walked: [Int] = []
    }

    public let limits: Limits
    let pageCount: Int
    private var streams: [Stream] = []
    private var clock: UInt64 = 0

    /// `pageCount`: guest pages in all; plans never leave 0..<pageCount.
    public init(pageCount: Int, limits: Limits = Limits()) {
        self.pageCount = pageCount
        self.limits = limits
    }

    /// A fault on guest page `p`: what to prefetch now, and what the stream
    /// walked past since its previous fault.
    public mutating func fault(_ p: Int) -> Decision {
        clock += 1
        guard let i = streamIndex(for: p) else {
            if streams.count >= limits.streams, let lru = streams.indices.min(by: { streams[$0].lastUse < streams[$1].lastUse }) {
                streams.remove(at: lru)
            }
            streams.append(Stream(last: p, lastUse: clock))
            return Decision()
        }
        var s = streams[i]
        defer { streams[i] = s }
        s.lastUse = clock
        let raw = p - s.last
        if raw == 0 { return Decision() }  // the same page again (woken and faulted anew)
        var delta = raw
        var decision = Decision()
        if let w = s.pending {
            let passed = Self.walked(to: p, window: w)
            decision.walked = passed > 0 ? (1...passed).map { w.start + w.stride * $0 } : []
            if Self.onTrend(to: p, window: w) {
                // Walking the window along its stride shows as one long delta:
                // it votes as the stride it confirms.
                delta = w.stride
                s.depth = min(limits.maxDepth, max(s.depth, 1) * 2)
            } else if passed == 0 {
                s.depth /= 2
            }
            s.pending = nil
        }
        s.deltas.append(delta)
        if s.deltas.count > limits.history { s.deltas.removeFirst() }
        s.last = p
        guard let stride = Self.majority(s.deltas), stride != 0, abs(stride) <= limits.maxStride else { return decision }
        if s.depth == 0 { s.depth = limits.initialDepth }
        // Never past the ends of memory.
        let room = stride > 0 ? (pageCount - 1 - p) / stride : p / -stride
        let depth = min(s.depth, room)
        guard depth > 0 else { return decision }
        s.pending = (p, stride, depth)
        decision.plan = Plan(stride: stride, depth: depth, start: p)
        return decision
    }

    /// The stream `p` belongs to: the nearest whose last fault is within its
    /// reach (its prefetch window plus `near`).
    private func streamIndex(for p: Int) -> Int? {
        var best: (Int, Int)?
        for (i, s) in streams.enumerated() {
            let reach = limits.near + (s.pending.map { $0.depth * abs($0.stride) } ?? 0)
            let d = abs(p - s.last)
            if d <= reach, best.map({ d < $0.1 }) ?? true { best = (i, d) }
        }
        return best?.0
    }

    /// Whether the fault at `to` continues the stream along the window's
    /// stride: inside the window at a stride position, or the next one after it.
    static func onTrend(to: Int, window w: (start: Int, stride: Int, depth: Int)) -> Bool {
        let d = to - w.start
        guard d % w.stride == 0 else { return false }
        let k = d / w.stride
        return k >= 1 && k <= w.depth + 1
    }

    /// Window pages strictly between the stream's last fault and `to`, along the stride.
    static func walked(to: Int, window w: (start: Int, stride: Int, depth: Int)) -> Int {
        // Along a positive direction: positions start + stride * j, j >= 1, before `to`.
        let (d, stride) = w.stride > 0 ? (to - w.start, w.stride) : (w.start - to, -w.stride)
        guard d > 0 else { return 0 }
        return min((d - 1) / stride, w.depth)
    }

    /// The delta more than half of `deltas` agree on (Boyer-Moore vote), if any.
    public static func majority(_ deltas: [Int]) -> Int? {
        guard deltas.count >= 2 else { return nil }
        var candidate = 0, votes = 0
        for d in deltas {
            if votes == 0 { candidate = d; votes = 1 } else if d == candidate { votes += 1 } else { votes -= 1 }
        }
        return deltas.filter { $0 == candidate }.count * 2 > deltas.count ? candidate : nil
    }
}
