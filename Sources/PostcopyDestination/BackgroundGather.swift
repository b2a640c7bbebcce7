import PostcopyWire

/// The background stream in gathers (a channel that can: TCP with the
/// `gather` capability). Where the missing pages are scattered (the stale
/// pages after precopy, pages between zero pages), each run alone would be one
/// request and one reply, a few pages each; one gather carries a batch's worth
/// of runs, with one reply received in place. Where they are not, a gather is
/// one run of a batch: the ordinary request.
///
/// Measured before (1 GiB zipf guest, 1 % writes, hybrid): 13 188 stale pages
/// after the pause, one request each, took 153 ms to come in, the guest at
/// 0.1 M ops/s meanwhile (its hot pages are the stale ones).
extension PostcopyEngine {
    /// The runs of one gather: `claim(pagesLeft)` claims the next run of at
    /// most that many pages (nil: none left), until `batch` pages or
    /// `WireProtocol.maxGatherRuns` runs. Nil when the first claim finds none.
    /// The background stream's and the precopy passes' gathers.
    func gatherRuns(batch: Int, _ claim: (Int) -> (first: Int, count: Int)?) -> [(first: Int, count: Int)]? {
        var runs: [(first: Int, count: Int)] = []
        var total = 0
        while total < batch, runs.count < WireProtocol.maxGatherRuns, let run = claim(batch - total) {
            runs.append(run)
            total += run.count
        }
        return runs.isEmpty ? nil : runs
    }

    /// Claims (marks in flight) runs of missing pages from `cursor` on, in
    /// address order, as `claimBackgroundRun` claims them, for one gather.
    /// Nil when no page is missing (in [cursor, upTo) with `upTo`).
    func claimBackgroundGather(from cursor: Int, upTo: Int = .max) -> [(first: Int, count: Int)]? {
        assert(backgroundThread.isCurrent)
        var next = cursor
        return gatherRuns(batch: max(config.batchPages / unitPages, 1) * unitPages) { left in
            let run = claimBackgroundRun(from: next, limit: left, upTo: upTo)
            if let run { next = run.first + run.count }
            return run
        }
    }
}
