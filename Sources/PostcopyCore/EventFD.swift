import CPostcopy

/// An eventfd (eventfd(2), close-on-exec, non-blocking) used to wake a thread
/// blocked in epoll or poll (shutdown, new work).
public final class EventFD: Sendable {
    public let fd: OwnedFD
    public init() throws(SystemError) {
        let r = try sysCall("eventfd") { cpc_eventfd(0, CPC_EFD_CLOEXEC | CPC_EFD_NONBLOCK) }
        fd = OwnedFD(r)
    }
    public func signal() { _ = cpc_eventfd_signal(fd.raw) }
    public func drain() { _ = cpc_eventfd_drain(fd.raw) }
}
