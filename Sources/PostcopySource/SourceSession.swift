import PostcopyCore
import Synchronization

/// Counters of one source, readable while it serves.
public final class SourceStats: Sendable {
    public let demandPages = Atomic<UInt64>(0)
    public let prefetchPages = Atomic<UInt64>(0)
    public let backgroundPages = Atomic<UInt64>(0)
    public let zeroReplies = Atomic<UInt64>(0)
    public let pagesSentTwice = Atomic<UInt64>(0)
    public let bytesSent = Atomic<UInt64>(0)
    public let bytesReceived = Atomic<UInt64>(0)
    public let rejectedConnections = Atomic<UInt64>(0)
    public let completedSessions = Atomic<UInt64>(0)
    /// Main connections that resumed an existing session (a destination reconnecting).
    public let resumedSessions = Atomic<UInt64>(0)
    public let lastDigestMatched = Atomic<Bool>(false)
}

/// One migration session: the pages already sent (each page goes out once per
/// session; a second send is counted, never silent).
final class SourceSession: Sendable {
    let id: UInt64
    private let sent: Locked<(bits: [UInt64], distinct: Int)>

    init(id: UInt64, pages: Int) {
        self.id = id
        sent = Locked(([UInt64](repeating: 0, count: (pages + 63) / 64), 0))
    }

    /// Pages sent at least once.
    var distinctSent: Int { sent.withLock { $0.distinct } }

    /// Marks pages sent; returns how many had been sent before.
    func markSent(globalFirst: Int, count: Int) -> Int {
        sent.withLock { s in
            var dup = 0
            for p in globalFirst..<(globalFirst + count) {
                let m: UInt64 = 1 << UInt64(p & 63)
                if s.bits[p >> 6] & m != 0 { dup += 1 } else { s.bits[p >> 6] |= m }
            }
            s.distinct += count - dup
            return dup
        }
    }
}

/// The sessions a source serves, by id: a main connection opens one (or
/// resumes it after a cut), urgent connections join it, completion ends it.
final class SessionTable: Sendable {
    private let sessions = Locked<[UInt64: SourceSession]>([:])

    /// The live session `id`, or nil (unknown or completed).
    func session(_ id: UInt64) -> SourceSession? {
        sessions.withLock { $0[id] }
    }

    /// A new session with a fresh random id.
    func open(pages: Int) -> SourceSession {
        var rng = SystemRandomNumberGenerator()
        let session = SourceSession(id: rng.next() | 1, pages: pages)
        sessions.withLock { $0[session.id] = session }
        return session
    }

    func end(_ id: UInt64) {
        sessions.withLock { _ = $0.removeValue(forKey: id) }
    }
}
