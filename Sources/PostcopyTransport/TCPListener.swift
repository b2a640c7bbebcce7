import CPostcopy
import PostcopyCore
#if canImport(Glibc)
import Glibc
#endif

/// A listening TCP socket.
public final class TCPListener: Sendable {
    public let fd: OwnedFD
    public let port: Int

    public init(_ endpoint: Endpoint) throws(TransportError) {
        var err = [CChar](repeating: 0, count: 256)
        var bound: Int32 = 0
        let r = cpc_tcp_listen(endpoint.host, String(endpoint.port), 64, &bound, &err, 256)
        if r < 0 { throw .system(SystemError("listen on \(endpoint)", errno: -r)) }
        fd = OwnedFD(r)
        port = Int(bound)
    }

    /// Blocks for the next connection; returns nil once the listener was shut down.
    public func accept(maxBody: Int) throws(TransportError) -> TCPConnection? {
        var peer = [CChar](repeating: 0, count: 80)
        while true {
            let raw = fd.raw
            if raw < 0 { return nil }
            let r = cpc_tcp_accept(raw, &peer, 80)
            if r >= 0 {
                return TCPConnection(fd: r, peer: String(decoding: peer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self), maxBody: maxBody)
            }
            if r == -EINVAL || r == -EBADF { return nil }  // shut down
            if r == -ECONNABORTED || r == -EMFILE || r == -ENFILE { continue }
            throw .system(SystemError("accept", errno: -r))
        }
    }

    public func shutdown() {
        _ = cpc_shutdown(fd.raw)
    }
}
