import PostcopyCore

/// What woke an engine thread: the epoll token each watched descriptor is
/// registered with, in both the fault and the background loop.
enum EngineEvent: UInt64 {
    /// The userfaultfd has messages (faults, REMOVE events). Fault thread.
    case uffd = 1
    /// The thread's page channel has replies (demand or background).
    case channel
    /// `stop()` was called.
    case shutdown
    /// An APF channel was attached or detached. Fault thread.
    case apfWake
    /// The attached APF channel has "page not present" requests. Fault thread.
    case apfRequests
    /// The final dirty set was applied: faults parked on precopied pages go on. Fault thread.
    case finalSet
    /// The fault thread queued prefetch runs for the background channel. Background thread.
    case prefetch
}

extension Epoll {
    func add(_ target: Int32, for event: EngineEvent) throws(SystemError) {
        try add(target, token: event.rawValue)
    }
}

extension [UInt64] {
    /// Whether `event` is among the tokens `Epoll.wait` returned.
    @inline(__always)
    func contains(_ event: EngineEvent) -> Bool { contains(event.rawValue) }
}
