#if canImport(Glibc)
import Glibc
#endif

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
