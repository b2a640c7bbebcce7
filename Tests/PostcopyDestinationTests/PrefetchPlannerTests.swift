import PostcopyDestination
import Testing

/// The prefetch planner on synthetic fault streams. A stream of faults is
/// replayed as the engine would see it: a page the planner had asked for
/// (and that is therefore present) makes no fault when the guest touches it.
@Suite("Prefetch trend detection")
struct PrefetchPlannerTests {
    /// Replays `touches` (guest page numbers, in order) through a planner,
    /// with prefetched pages arriving at once; returns the faults taken, the
    /// pages prefetched, and those shown used (walked past along the trend).
    func replay(_ touches: [Int], pages: Int = 1 << 20, limits: PrefetchPlanner.Limits = .init())
        -> (faults: Int, prefetched: Int, hits: Int, planner: PrefetchPlanner) {
        var planner = PrefetchPlanner(pageCount: pages, limits: limits)
        var present = Set<Int>()
        var unconfirmed = Set<Int>()
        var faults = 0, prefetched = 0, hits = 0
        for p in touches where !present.contains(p) {
            faults += 1
            present.insert(p)
            let d = planner.fault(p)
            for u in d.walked where unconfirmed.remove(u) != nil { hits += 1 }
            for q in d.plan?.pages ?? [] {
                #expect(q >= 0 && q < pages, "plan leaves memory: \(q)")
                if present.insert(q).inserted {
                    prefetched += 1
                    unconfirmed.insert(q)
                }
            }
        }
        return (faults, prefetched, hits, planner)
    }

    @Test func sequentialFaultsRampUpToTheMaximumDepth() {
        let r = replay(Array(1000..<11000))
        // 10,000 pages touched: after the ramp, one fault per maxDepth + 1 pages.
        #expect(r.faults < 10_000 / 64 + 20, "\(r.faults) faults")
        #expect(r.prefetched > 9_700)
        #expect(r.hits >= r.prefetched - 64, "every prefetched page but the last window was walked past: \(r.hits) of \(r.prefetched)")
    }

    @Test func reverseScanIsATrendToo() {
        let r = replay(Array((1000..<11000).reversed()))
        #expect(r.faults < 10_000 / 64 + 20, "\(r.faults) faults")
        #expect(r.hits >= r.prefetched - 64)
    }

    @Test func stridedAccessPrefetchesAlongTheStride() {
        let touches = Array(stride(from: 5000, to: 5000 + 4 * 4000, by: 4))
        let r = replay(touches)
        #expect(r.faults < 4000 / 64 + 20, "\(r.faults) faults")
        // Only the stride's pages: none in between was asked for.
        var planner = PrefetchPlanner(pageCount: 1 << 20)
        var stridesOK = true
        for p in touches.prefix(40) {
            for q in planner.fault(p).plan?.pages ?? [] where (q - 5000) % 4 != 0 { stridesOK = false }
        }
        #expect(stridesOK)
    }

    @Test func randomFaultsPrefetchNothing() {
        var rng = SystemRandomNumberGenerator()
        let touches = (0..<20_000).map { _ in Int.random(in: 0..<(1 << 20), using: &rng) }
        let r = replay(touches)
        // Two faults within the same small window, twice in a row, by chance:
        // rare over a million pages; a handful of pages at most.
        #expect(r.prefetched <= 64, "\(r.prefetched) pages prefetched for random faults")
    }

    @Test func interleavedScansOfSeveralThreadsAreSeparateStreams() {
        // Four vCPUs scanning their own quarter, their faults interleaved.
        let quarter = 1 << 18
        var touches: [Int] = []
        for i in 0..<5000 { for t in 0..<4 { touches.append(t * quarter + i) } }
        let r = replay(touches)
        #expect(r.faults < 4 * (5000 / 64 + 20), "\(r.faults) faults")
        #expect(r.hits >= r.prefetched - 4 * 64)
    }

    @Test func interleavedStridesAndDirectionsKeepTheirOwnTrends() {
        // One thread ascending by 1, another descending by 2, far apart.
        var touches: [Int] = []
        for i in 0..<3000 { touches.append(10_000 + i); touches.append(500_000 - 2 * i) }
        let r = replay(touches)
        #expect(r.faults < 2 * (3000 / 32 + 20), "\(r.faults) faults")
    }

    @Test func depthShrinksWhenTheTrendStops() {
        var planner = PrefetchPlanner(pageCount: 1 << 20)
        var p = 100
        var depth = 0
        // A sequential run: depth grows.
        for _ in 0..<10 {
            let d = planner.fault(p)
            depth = d.plan?.depth ?? depth
            p += (d.plan?.depth ?? 0) + 1
        }
        #expect(depth == PrefetchPlanner.Limits().maxDepth)
        // Then faults near it but off the trend (irregular jumps back): the
        // depth halves at each, and once most of the history disagrees, no plan.
        var planned: [Int] = []
        // (The first jump lands before the last window: inside it, a fault is on the trend.)
        for jump in [70, 37, 53, 41, 59, 43, 61, 47, 67, 71] {
            p -= jump
            planned.append(planner.fault(p).plan?.depth ?? 0)
        }
        #expect(planned.reduce(0, +) <= 64, "pages planned after the trend broke: \(planned)")
        #expect(planned.suffix(5).allSatisfy { $0 == 0 }, "still planning: \(planned)")
    }

    @Test func plansNeverLeaveMemory() {
        let r = replay(Array(0..<300), pages: 256)
        #expect(r.faults >= 1)
        let down = replay(Array((0..<256).reversed()), pages: 256)
        #expect(down.faults >= 1)
    }

    @Test func majorityVote() {
        #expect(PrefetchPlanner.majority([1, 1, 5, 1]) == 1)
        #expect(PrefetchPlanner.majority([1, 2, 3, 4]) == nil)
        #expect(PrefetchPlanner.majority([3, 3]) == 3)
        #expect(PrefetchPlanner.majority([7]) == nil)
        #expect(PrefetchPlanner.majority([2, -1, 2, -1]) == nil)
    }
}
