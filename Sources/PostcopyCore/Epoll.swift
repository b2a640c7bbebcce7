import CPostcopy

/// epoll over a few descriptors; `wait` returns the tokens that are ready.
public final class Epoll: Sendable {
    public let fd: OwnedFD
    public init() throws(SystemError) {
        fd = OwnedFD(try sysCall("epoll_create1") { cpc_epoll_create() })
    }
    public func add(_ target: Int32, token: UInt64, events: UInt32 = CPC_EPOLLIN) throws(SystemError) {
        _ = try sysCall("epoll_ctl(ADD)") { cpc_epoll_add(fd.raw, target, token, events) }
    }
    public func remove(_ target: Int32) { _ = cpc_epoll_del(fd.raw, target) }
    /// Waits up to `timeoutMs` (-1 forever); replaces `tokens` with the ready ones.
    public func wait(_ tokens: inout [UInt64], timeoutMs: Int32) throws(SystemError) {
        var buf: (UInt64, UInt64, UInt64, UInt64, UInt64, UInt64, UInt64, UInt64) = (0, 0, 0, 0, 0, 0, 0, 0)
        let n = withUnsafeMutableBytes(of: &buf) { raw in
            cpc_epoll_wait(fd.raw, raw.baseAddress!.assumingMemoryBound(to: UInt64.self), 8, timeoutMs)
        }
        if n < 0 { throw SystemError("epoll_wait", errno: -n) }
        tokens.removeAll(keepingCapacity: true)
        withUnsafeBytes(of: &buf) { raw in
            for i in 0..<Int(n) { tokens.append(raw.load(fromByteOffset: i * 8, as: UInt64.self)) }
        }
    }
}
