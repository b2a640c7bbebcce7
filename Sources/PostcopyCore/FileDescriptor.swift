import CPostcopy
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// Owns one file descriptor and closes it exactly once (on `close()` or in deinit).
public final class OwnedFD: Sendable {
    private let fd: Atomic<Int32>

    public init(_ fd: Int32) { self.fd = Atomic(fd) }

    /// The raw descriptor, or -1 once closed.
    public var raw: Int32 { fd.load(ordering: .acquiring) }

    public func close() {
        let old = fd.exchange(-1, ordering: .acquiringAndReleasing)
        if old >= 0 { _ = Glibc.close(old) }
    }

    deinit { close() }
}

/// An eventfd used to wake a thread blocked in epoll (shutdown, new work).
public final class EventFD: Sendable {
    public let fd: OwnedFD
    public init() throws(SystemError) {
        let r = try sysCall("eventfd") { cpc_eventfd(0, 0) }
        fd = OwnedFD(r)
    }
    public func signal() { _ = cpc_eventfd_signal(fd.raw) }
    public func drain() { _ = cpc_eventfd_drain(fd.raw) }
}

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

/// epoll over a few descriptors; `wait` returns the tokens that are ready.
public final class Epoll: Sendable {
    public let fd: OwnedFD
    public init() throws(SystemError) {
        fd = OwnedFD(try sysCall("epoll_create1") { cpc_epoll_create() })
    }
    public func add(_ target: Int32, token: UInt64, events: UInt32 = CPC_EPOLLIN) throws(SystemError) {
        _ = try sysCall("epoll_ctl(ADD)") { cpc_epoll_add(fd.raw, target, token, events) }
    }
    public func remove(_ target: Int32) { _ = cpc_epoll_del(fd.raw, target) }
    /// Waits up to `timeoutMs` (-1 forever); replaces `tokens` with the ready ones.
    public func wait(_ tokens: inout [UInt64], timeoutMs: Int32) throws(SystemError) {
        var buf: (UInt64, UInt64, UInt64, UInt64, UInt64, UInt64, UInt64, UInt64) = (0, 0, 0, 0, 0, 0, 0, 0)
        let n = withUnsafeMutableBytes(of: &buf) { raw in
            cpc_epoll_wait(fd.raw, raw.baseAddress!.assumingMemoryBound(to: UInt64.self), 8, timeoutMs)
        }
        if n < 0 { throw SystemError("epoll_wait", errno: -n) }
        tokens.removeAll(keepingCapacity: true)
        withUnsafeBytes(of: &buf) { raw in
            for i in 0..<Int(n) { tokens.append(raw.load(fromByteOffset: i * 8, as: UInt64.self)) }
        }
    }
}
