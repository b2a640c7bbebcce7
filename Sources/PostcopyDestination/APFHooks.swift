/// A guest's async page fault channel, as the engine uses it: `take` returns the
/// "page not present" requests posted so far (called on the fault thread when
/// `requestFD` is readable; it must consume the eventfd); `post` delivers "page
/// ready" (or "not guest memory") for tokens, from any engine thread.
public struct APFHooks: Sendable {
    public var requestFD: Int32
    public var take: @Sendable () -> [(token: UInt64, address: UInt64)]
    public var post: @Sendable ([(UInt64, APFStatus)]) -> Void
    public init(requestFD: Int32, take: @escaping @Sendable () -> [(token: UInt64, address: UInt64)],
                post: @escaping @Sendable ([(UInt64, APFStatus)]) -> Void) {
        self.requestFD = requestFD
        self.take = take
        self.post = post
    }
}

/// Completion statuses reported with an async page fault's token.
public enum APFStatus: UInt32, Sendable {
    /// The page is present: re-execute the access.
    case ready = 0
    /// The address is not guest memory of this VM: the guest must not retry it.
    case invalidAddress = 1
}
