#if canImport(Glibc)
import Glibc
#endif

/// A lock guarding state kept elsewhere (classes whose fields it protects).
public final class NSLockLite: @unchecked Sendable {
    // Not Locked<Void>: ThreadSanitizer instruments the inout access of a
    // zero-sized value at the address of the mutex pointer beside it, and reports
    // a race between the lock's own load of that pointer and the guarded access.
    private let lock = Locked<UInt8>(0)
    public init() {}
    @inline(__always)
    public func withLock<T, E: Error>(_ body: () throws(E) -> T) throws(E) -> T {
        try lock.withLock { (_: inout UInt8) throws(E) -> T in try body() }
    }
}

/// A value guarded by a pthread mutex: the project's `Mutex`. Not
/// `Synchronization.Mutex`, whose lock ThreadSanitizer cannot see on Linux (the
/// standard library is not instrumented), so that every access under it showed
/// up as a data race and hid real ones; pthread mutexes are intercepted by
/// ThreadSanitizer. Uncontended, both cost one atomic operation.
public final class Locked<Value>: @unchecked Sendable {
    private let m: UnsafeMutablePointer<pthread_mutex_t>
    private var value: Value
    public init(_ value: Value) {
        self.value = value
        m = .allocate(capacity: 1)
        m.initialize(to: pthread_mutex_t())
        pthread_mutex_init(m, nil)
    }
    deinit {
        pthread_mutex_destroy(m)
        m.deallocate()
    }
    @inline(__always)
    public func withLock<R, E: Error>(_ body: (inout Value) throws(E) -> R) throws(E) -> R {
        pthread_mutex_lock(m)
        defer { pthread_mutex_unlock(m) }
        return try body(&value)
    }
}
