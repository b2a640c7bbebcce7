extension RandomAccessCollection where Index == Int {
    /// For elements sorted by `start` (regions, chunks: runs of pages laid end
    /// to end), the index of the last one starting at or before `p`: the run
    /// holding `p`. 0 when none does (or the collection is empty). Binary search.
    public func lastIndex(startingAtOrBefore p: Int, start: (Element) -> Int) -> Int {
        var lo = startIndex, hi = endIndex - 1
        while lo < hi {
            let mid = (lo + hi + 1) / 2
            if start(self[mid]) <= p { lo = mid } else { hi = mid - 1 }
        }
        return lo
    }
}
