import PostcopyCore

/// What settling pages under `pages.lock` leaves to do after it (`finishSettling`).
struct SettledPages {
    /// Read under the lock: another thread may have stamped a fault on these
    /// pages after a clock read taken before it (a later time).
    private(set) var now: UInt64 = 0
    /// First-fault times of the pages guests waited on, APF tokens parked on them.
    var waits: [UInt64] = []
    var tokens: [UInt64] = []
    var pages = 0
    var complete = false

    mutating func stamp() { now = nowNanoseconds() }
}
