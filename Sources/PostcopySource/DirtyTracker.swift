import PostcopyCore

/// Which pages of guest RAM the guest writes while it runs: what precopy passes
/// send again. `collect` returns the pages written since the previous call (or
/// since tracking began) and tracks them again from that instant: a write that
/// races with the call is in this set or in the next one, never in neither, so
/// a page read for sending after the call that returned it is either sent as
/// it is at the end or reported again.
///
/// `WriteProtectTracker` implements it with the kernel's async write-protect;
/// a VMM with its own dirty log (KVM's `KVM_GET_DIRTY_LOG`) can supply one too.
///
/// Tracking may start piece by piece (`startTracking`), so that precopy's
/// first pass can send a piece as soon as it is tracked instead of waiting
/// until all of RAM is.
public protocol DirtyTracker: AnyObject, Sendable {
    var pageSize: Int { get }
    var pageCount: Int { get }
    /// From now on, writes to `pages` are tracked.
    func startTracking(pages: Range<Int>) throws(SystemError)
    /// The pages of `pages` (tracked ones) written since they were last
    /// collected or began to be tracked, tracked anew from this instant.
    func collect(pages: Range<Int>) throws(SystemError) -> DirtyPages
    /// The pages `collect` would return now, without tracking them anew (for a
    /// policy that watches how fast the guest writes).
    func peek(pages: Range<Int>) throws(SystemError) -> DirtyPages
    /// Stops tracking for good (precopy cancelled): the memory is no longer
    /// watched, and every later call throws.
    func stop()
}

extension DirtyTracker {
    /// `collect` over every page.
    public func collect() throws(SystemError) -> DirtyPages { try collect(pages: 0..<pageCount) }
}
