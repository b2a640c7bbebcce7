import Synchronization
#if canImport(Glibc)
import Glibc
#endif

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

/// The thread that owns some engine state, for debug-build checks:
/// `assert(faultThread.isCurrent)` in methods only that thread may call.
/// `assert` is not evaluated in release builds.
struct ThreadOwner: ~Copyable {
    private let id = Atomic<UInt>(0)

    init() {}

    /// First thing on the owning thread.
    func claim() { id.store(UInt(pthread_self()), ordering: .relaxed) }

    var isCurrent: Bool { pthread_equal(pthread_t(id.load(ordering: .relaxed)), pthread_self()) != 0 }
}
