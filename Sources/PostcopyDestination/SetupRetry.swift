import Logging
import PostcopyCore
import PostcopyTransport

/// Retries of a session's set-up (the handshake, the channels, the first
/// control calls) when the connection to the source is lost on the way: the
/// same recovery deadline as a connection lost later, with backoff. Shared by
/// the standalone destination and the handoff daemon.
public struct SetupRetry {
    public let deadline: Double
    public let logger: Logger

    public init(deadline: Double, logger: Logger) {
        self.deadline = deadline
        self.logger = logger
    }

    /// A failure worth trying the handshake again for: the connection closed
    /// or a record failed its check before the session existed. A source
    /// that refuses, or is not there, is reported at once.
    public static func handshakeRetryable(_ e: TransportError) -> Bool {
        switch e {
        case .closed, .integrity: return true
        default: return false
        }
    }

    /// Runs `attempt` (told whether it is a retry) until it succeeds. A failure
    /// `retryable` accepts is tried again after a backoff, until the deadline
    /// counted from `since`; the time from the first failure to the success
    /// joins `recoveries`.
    public func run<T>(_ stage: String, _ then: String, since: UInt64 = nowNanoseconds(), recoveries: inout [UInt64],
                       retryable: (TransportError) -> Bool,
                       _ attempt: (_ isRetry: Bool) throws(TransportError) -> T) throws(TransportError) -> T {
        var backoff = Backoff(deadline: deadline, since: since)
        var lostAt: UInt64?
        while true {
            do {
                let value = try attempt(lostAt != nil)
                if let l = lostAt { recoveries.append(nowNanoseconds() - l) }
                return value
            } catch {
                if lostAt == nil { lostAt = nowNanoseconds() }
                guard retryable(error), deadline > 0, !backoff.expired else { throw error }
                logger.warning("connection to the source lost during \(stage) (\(error)); \(then)")
                backoff.wait()
            }
        }
    }
}
