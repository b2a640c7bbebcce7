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
