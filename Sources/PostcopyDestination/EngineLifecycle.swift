import Synchronization

/// Where the engine is in its life. It only moves forward (in declaration
/// order): a failure after completion, or `stop()` after a failure, keeps the
/// later state, and `failureReason` keeps the error.
enum EngineLifecycle: UInt8, AtomicRepresentable, Comparable {
    /// Built; no thread started.
    case created
    /// Threads serving; pages still missing.
    case running
    /// Every page was settled once: nothing more is needed from the source
    /// (late faults on zero pages and REMOVE events are served locally).
    case complete
    /// A thread ended on an error (`failureReason`).
    case failed
    /// `stop()` was called: threads are ending, a reconnect in progress gives up.
    case stopping
    /// Threads joined.
    case stopped

    static func < (a: Self, b: Self) -> Bool { a.rawValue < b.rawValue }
}

extension Atomic where Value == EngineLifecycle {
    /// Moves to `state` unless already there or further.
    func advance(to state: EngineLifecycle) {
        var current = load(ordering: .relaxed)
        while current < state {
            let (exchanged, original) = compareExchange(expected: current, desired: state, ordering: .acquiringAndReleasing)
            if exchanged { return }
            current = original
        }
    }
}
