import CPostcopy
import Histogram
import PostcopyCore

/// Threads that read one byte of every page, in random or sequential order, and
/// time each read that took a userfaultfd fault (guest-observed fault latency).
final class GuestToucher: @unchecked Sendable {
    struct Result {
        var summary: LatencySummary
        var pages: Int
    }
    private let mode: TouchMode
    private let threadCount: Int
    private let seed: UInt64
    private let thinkNanoseconds: UInt64
    /// Guest address and byte offset in guest RAM of each page to touch, in order.
    private let addresses: [(address: UInt64, offset: Int)]
    private let pageSize: Int
    private let onTouch: (@Sendable (Int, UnsafeRawBufferPointer) -> Void)?
    private let engine: PostcopyEngine
    private var threads: [PThread] = []
    private let merged = Locked<(Histogram<UInt64>, Int)>((LatencyHistogram.make(), 0))

    init(mode: TouchMode, threads: Int, seed: UInt64, thinkNanoseconds: UInt64, regions: [GuestRegion], pageSize: Int, engine: PostcopyEngine,
         onTouch: (@Sendable (Int, UnsafeRawBufferPointer) -> Void)? = nil) {
        self.mode = mode
        self.pageSize = pageSize
        self.onTouch = onTouch
        self.thinkNanoseconds = thinkNanoseconds
        threadCount = max(1, threads)
        self.seed = seed
        self.engine = engine
        var a: [(address: UInt64, offset: Int)] = []
        if mode != .none {
            for r in regions {
                for i in 0..<(r.size / pageSize) { a.append((r.base + UInt64(i * pageSize), (r.sourceFirstPage + i) * pageSize)) }
            }
            if mode == .random || mode == .shared {
                var rng = SplitMix64(seed: seed)
                a.shuffle(using: &rng)
            }
        }
        addresses = a
    }

    func start() {
        guard mode != .none else { return }
        let n = threadCount
        let per = (addresses.count + n - 1) / n
        // In shared mode another thread's fault also marks a page, so per-touch
        // latency would be mislabelled there: it is not recorded.
        let record = mode != .shared
        for t in 0..<n {
            let slice = mode == .shared ? 0..<addresses.count : min(t * per, addresses.count)..<min((t + 1) * per, addresses.count)
            threads.append(PThread(name: "guest-vcpu\(t)") { [self] in
                var h = LatencyHistogram.make()
                for i in slice {
                    let (a, offset) = addresses[i]
                    let t0 = nowNanoseconds()
                    _ = cpc_touch_read(UnsafeRawPointer(bitPattern: UInt(a))!)
                    let dt = nowNanoseconds() - t0
                    if record, engine.pageFaulted(address: a) { _ = h.record(max(dt, 1)) }
                    onTouch?(offset, UnsafeRawBufferPointer(start: UnsafeRawPointer(bitPattern: UInt(a)), count: pageSize))
                    if thinkNanoseconds > 0 {
                        let until = nowNanoseconds() + thinkNanoseconds
                        while nowNanoseconds() < until {}
                    }
                }
                let hist = h
                merged.withLock { $0.0.add(hist); $0.1 += slice.count }
            })
        }
    }

    func join() -> Result {
        for t in threads { t.join() }
        return merged.withLock { Result(summary: LatencySummary($0.0), pages: $0.1) }
    }
}
