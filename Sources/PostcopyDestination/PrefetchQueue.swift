import PostcopyTransport
import PostcopyWire

/// Prefetch runs on their way from the fault thread to the background thread
/// (first source page, pages), and whether the background thread takes them.
struct PrefetchQueue {
    var runs: [(first: Int, count: Int)] = []
    var open = false
}

extension PostcopyEngine {
    /// Background thread: sends the prefetch runs the fault thread queued, as
    /// one gather of class prefetch (ahead of the stream's next). Returns the
    /// requests and pages sent, for its window.
    func submitQueuedPrefetch(_ channel: PageChannel) throws(TransportError) -> (requests: Int, pages: Int) {
        assert(backgroundThread.isCurrent)
        let runs = prefetchQueue.withLock { q -> [(first: Int, count: Int)] in
            defer { q.runs.removeAll(keepingCapacity: true) }
            return q.runs
        }
        guard !runs.isEmpty else { return (0, 0) }
        var start = 0, pages = 0
        while start < runs.count {
            // Within a gather's limits (runs and pages), in as few gathers as that allows.
            var end = start, total = 0
            while end < runs.count, end - start < Int(WireProtocol.maxGatherRuns), total + runs[end].count <= Int(WireProtocol.maxPagesPerRequest) {
                total += runs[end].count
                end += 1
            }
            try submitGather(channel, runs: Array(runs[start..<end]), class: .prefetch, ownedByStream: true)
            pages += total
            start = end
        }
        return (runs.count, pages)
    }

    /// Background thread, about to end: stops taking prefetch runs, unless
    /// some are queued (then false: they must go out first).
    func closePrefetchQueueIfEmpty() -> Bool {
        prefetchQueue.withLock { q in
            guard q.runs.isEmpty else { return false }
            q.open = false
            return true
        }
    }
}
