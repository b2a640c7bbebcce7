import PostcopyCore
import Synchronization

/// An engine's per-page bookkeeping and its latency histograms, made ahead of
/// the engine: by a daemon while it preallocates guest memory, before the
/// source pauses. On these machines a fresh page's first touch is what costs
/// most, and this memory (about 1.4 MiB for 1 GiB of guest RAM) made after
/// the pause held the stream back: measured on a 1 GiB kv guest (2 cores,
/// perf), 11 ms between the pause and the first background request, in page
/// faults of the page states and the histograms' counts.
public final class EngineStorage: @unchecked Sendable {
    let pages: PageStates
    let latencyOnFaultThread = LatencyRecorder()
    let latencyOnBackgroundThread = LatencyRecorder()
    let demandLatencyOnFaultThread = LatencyRecorder()
    let demandLatencyOnBackgroundThread = LatencyRecorder()

    /// For a session of `totalPages` source pages (an engine for another
    /// count makes its own).
    public init(totalPages: Int) {
        pages = PageStates(count: totalPages)
    }

    private let taken = Atomic<Bool>(false)

    /// This storage for one engine of `totalPages` pages; nil for another
    /// count, or once an engine took it.
    func take(totalPages: Int) -> EngineStorage? {
        guard totalPages == pages.count, !taken.exchange(true, ordering: .relaxed) else { return nil }
        return self
    }
}
