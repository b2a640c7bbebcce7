import Synchronization
#if canImport(Glibc)
import Glibc
#endif

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
