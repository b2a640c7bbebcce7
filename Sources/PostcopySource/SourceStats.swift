import Synchronization

/// Counters of one source, readable while it serves.
public final class SourceStats: Sendable {
    public let demandPages = Atomic<UInt64>(0)
    public let prefetchPages = Atomic<UInt64>(0)
    public let backgroundPages = Atomic<UInt64>(0)
    /// Pages sent by precopy passes (before the pause, and a page each time it was written).
    public let precopyPages = Atomic<UInt64>(0)
    public let zeroReplies = Atomic<UInt64>(0)
    /// Gather requests answered (many runs, one reply each).
    public let gathers = Atomic<UInt64>(0)
    /// Of those, gathers of precopy pages (during a pass).
    public let precopyGathers = Atomic<UInt64>(0)
    /// Zero maps answered (a destination asks for one chunk of RAM at a time).
    public let zeroMaps = Atomic<UInt64>(0)
    public let pagesSentTwice = Atomic<UInt64>(0)
    public let bytesSent = Atomic<UInt64>(0)
    public let bytesReceived = Atomic<UInt64>(0)
    /// Frame bytes encrypted for closed connections (0 without encryption).
    public let bytesEncrypted = Atomic<UInt64>(0)
    public let rejectedConnections = Atomic<UInt64>(0)
    public let completedSessions = Atomic<UInt64>(0)
    /// Main connections that resumed an existing session (a destination reconnecting).
    public let resumedSessions = Atomic<UInt64>(0)
    public let lastDigestMatched = Atomic<Bool>(false)
}
