import CPostcopy
#if canImport(Glibc)
import Glibc
#endif

/// A failed system call: which stage failed, and the errno the kernel gave.
public struct SystemError: Error, Sendable, CustomStringConvertible, Equatable {
    public var stage: String
    public var errno: Int32

    public init(_ stage: String, errno: Int32) {
        self.stage = stage
        self.errno = errno
    }

    public var description: String {
        let text = strerror(errno).map { String(cString: $0) } ?? "errno \(errno)"
        return "\(stage): \(text) (errno \(errno))"
    }
}

/// Turns a shim result (non-negative value or -errno) into a value or a typed error.
/// `EINTR` is retried here, so callers never see it.
@inline(__always)
public func sysCall(_ stage: @autoclosure () -> String, _ body: () -> Int32) throws(SystemError) -> Int32 {
    while true {
        let r = body()
        if r >= 0 { return r }
        if r == -EINTR { continue }
        throw SystemError(stage(), errno: -r)
    }
}

/// Same for libc calls that return -1 and set errno.
@inline(__always)
public func libcCall<T: BinaryInteger>(_ stage: @autoclosure () -> String, _ body: () -> T) throws(SystemError) -> T {
    while true {
        let r = body()
        if r >= 0 { return r }
        let e = Glibc.errno
        if e == EINTR { continue }
        throw SystemError(stage(), errno: e)
    }
}

/// Monotonic nanoseconds.
@inline(__always)
public func nowNanoseconds() -> UInt64 { cpc_now_ns() }

/// CPU time (user + system, all threads) of this process, in nanoseconds.
public func processCPUNanoseconds() -> UInt64 { cpc_process_cpu_ns() }

/// Waits between attempts to reach a peer again: 2 ms, doubling up to 0.5 s,
/// with a deadline in seconds counted from `since`.
public struct Backoff: Sendable {
    public let since: UInt64
    public let deadline: Double
    private var delay: UInt32 = 2_000

    public init(deadline: Double, since: UInt64 = nowNanoseconds()) {
        self.deadline = deadline
        self.since = since
    }

    /// True once `deadline` seconds have passed since `since`.
    public var expired: Bool { Double(nowNanoseconds() - since) / 1e9 >= deadline }

    /// Sleeps for the current delay, then doubles it.
    public mutating func wait() {
        usleep(delay)
        delay = min(delay * 2, 500_000)
    }
}
