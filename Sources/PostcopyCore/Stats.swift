import Histogram
import Synchronization

/// The one shape of latency histogram in the project, so that histograms from
/// any thread or module merge: nanoseconds, 3 significant digits, tracking up to
/// 60 s and resizing beyond rather than dropping a value.
public enum LatencyHistogram {
    public static func make() -> Histogram<UInt64> {
        var h = Histogram<UInt64>(highestTrackableValue: 60_000_000_000, numberOfSignificantValueDigits: .three)
        h.autoResize = true
        return h
    }
}

/// Latency histogram in nanoseconds (HdrHistogram, 3 significant digits),
/// safe to record from several threads; each thread may also keep its own and merge.
public final class LatencyRecorder: Sendable {
    private let hist: Locked<Histogram<UInt64>>
    private let total = Atomic<UInt64>(0)

    public init() {
        hist = Locked(LatencyHistogram.make())
    }

    public func record(nanoseconds: UInt64) {
        hist.withLock { _ = $0.record(max(nanoseconds, 1)) }
        total.add(nanoseconds, ordering: .relaxed)
    }

    public func merge(_ other: Histogram<UInt64>) {
        hist.withLock { $0.add(other) }
    }

    public func snapshot() -> LatencySummary {
        hist.withLock { LatencySummary($0) }
    }

    /// A copy of the histogram (to merge per-thread recorders at the end).
    public func histogram() -> Histogram<UInt64> { hist.withLock { $0 } }

    /// Sum of every recorded value (for faults: the total time guest threads waited).
    public var totalNanoseconds: UInt64 { total.load(ordering: .relaxed) }

    /// Merges per-thread recorders into one histogram.
    public static func merged(_ recorders: [LatencyRecorder]) -> Histogram<UInt64> {
        var h = LatencyHistogram.make()
        for r in recorders { h.add(r.histogram()) }
        return h
    }
}

/// Points of a latency CDF, [percentile, nanoseconds], read off a histogram (for plots).
public func latencyCDF(_ h: Histogram<UInt64>) -> [[Double]] {
    guard h.totalCount > 0 else { return [] }
    let points: [Double] = [0, 1, 5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 95, 97, 99, 99.5, 99.9, 99.99, 100]
    return points.map { [$0, Double(h.valueAtPercentile($0))] }
}

/// Percentiles taken from recorded data (never constants).
public struct LatencySummary: Sendable, Codable, Equatable {
    public var count: UInt64
    public var p50Ns: UInt64
    public var p90Ns: UInt64
    public var p99Ns: UInt64
    public var p999Ns: UInt64
    public var maxNs: UInt64
    public var meanNs: Double

    public init(_ h: Histogram<UInt64>) {
        count = h.totalCount
        if count == 0 {
            p50Ns = 0; p90Ns = 0; p99Ns = 0; p999Ns = 0; maxNs = 0; meanNs = 0
        } else {
            p50Ns = h.valueAtPercentile(50)
            p90Ns = h.valueAtPercentile(90)
            p99Ns = h.valueAtPercentile(99)
            p999Ns = h.valueAtPercentile(99.9)
            maxNs = h.max
            meanNs = h.mean
        }
    }

    enum CodingKeys: String, CodingKey {
        case count
        case p50Ns = "p50_ns"
        case p90Ns = "p90_ns"
        case p99Ns = "p99_ns"
        case p999Ns = "p999_ns"
        case maxNs = "max_ns"
        case meanNs = "mean_ns"
    }
}

/// How much a counter that only grows (an engine's or a server's) has grown
/// since the last reading: what a metrics counter fed from it must add.
public struct GrowthCursor: Sendable {
    public private(set) var last: UInt64 = 0
    public init() {}

    /// The growth since the last reading (0 if it did not grow), and `now`
    /// becomes the last reading.
    public mutating func growth(to now: UInt64) -> UInt64 {
        defer { last = max(last, now) }
        return now > last ? now - last : 0
    }
}
