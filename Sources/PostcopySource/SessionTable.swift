import PostcopyCore
import Synchronization

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
