/// Pages written since the previous look, as sorted, disjoint runs of page
/// indices (0 = the first page of the tracked range).
public struct DirtyPages: Sendable, Equatable {
    public private(set) var runs: [Range<Int>] = []

    public init() {}

    /// Runs in any order, possibly touching or overlapping: sorted and merged.
    public init(runs: [Range<Int>]) {
        for r in runs.filter({ !$0.isEmpty }).sorted(by: { $0.lowerBound < $1.lowerBound }) { append(r) }
    }

    /// Adds a run that starts at or after every run so far (merging when it touches the last).
    private mutating func append(_ r: Range<Int>) {
        guard !r.isEmpty else { return }
        if let last = runs.last, r.lowerBound <= last.upperBound {
            runs[runs.count - 1] = last.lowerBound..<max(last.upperBound, r.upperBound)
        } else {
            runs.append(r)
        }
    }

    public var count: Int { runs.reduce(0) { $0 + $1.count } }
    public var isEmpty: Bool { runs.isEmpty }

    public func contains(_ page: Int) -> Bool {
        var lo = 0, hi = runs.count
        while lo < hi {
            let mid = (lo + hi) / 2
            if runs[mid].upperBound <= page { lo = mid + 1 } else { hi = mid }
        }
        return lo < runs.count && runs[lo].contains(page)
    }
}
