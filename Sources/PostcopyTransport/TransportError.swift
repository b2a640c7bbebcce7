import PostcopyCore
import PostcopyWire

/// Why a transport operation failed. Each case tells an operator what to do next.
public enum TransportError: Error, Sendable, CustomStringConvertible {
    case system(SystemError)
    case wire(WireError)
    /// The peer answered with an error frame.
    case peer(ErrorMessage)
    /// The peer closed the connection (EOF) while we expected more.
    case closed(String)
    /// The peer sent a well-formed frame that breaks the protocol (wrong message,
    /// pages we did not ask for, a region outside the table).
    case protocolViolation(String)
    /// This transport cannot run here (for example: no RDMA device).
    case unavailable(String)
    case timedOut(String)
    /// A failure on this side (userfaultfd, memory), not the connection's.
    case local(SystemError)
    /// An encrypted record did not verify (tampered, replayed, reordered or
    /// cut): nothing of it was accepted; the connection is dropped and, like a
    /// lost one, reconnected with fresh keys.
    case integrity(String)

    /// A broken or stalled connection (worth reconnecting), as opposed to a peer
    /// that broke the protocol or refused us (never retried).
    public var isConnectionLoss: Bool {
        switch self {
        case .closed, .system, .timedOut, .integrity: return true
        default: return false
        }
    }

    public var description: String {
        switch self {
        case .system(let e): return e.description
        case .wire(let e): return "malformed frame from peer: \(e)"
        case .peer(let m): return "peer reported error \(m.code) : \(m.message)"
        case .closed(let s): return "connection closed by peer: \(s)"
        case .protocolViolation(let s): return "protocol violation by peer: \(s)"
        case .unavailable(let s): return "transport unavailable: \(s)"
        case .timedOut(let s): return "timed out: \(s)"
        case .local(let e): return e.description
        case .integrity(let s): return "encrypted stream failed its integrity check: \(s)"
        }
    }
}

/// Host and port parsed from "HOST:PORT" or "[IPv6]:PORT".
public struct Endpoint: Sendable, Equatable, CustomStringConvertible {
    public var host: String
    public var port: Int

    public init(host: String, port: Int) {
        self.host = host
        self.port = port
    }

    public init?(parsing s: String) {
        var hostPart: Substring
        var portPart: Substring
        if s.hasPrefix("[") {
            guard let close = s.firstIndex(of: "]"), s[s.index(after: close)...].hasPrefix(":") else { return nil }
            hostPart = s[s.index(after: s.startIndex)..<close]
            portPart = s[s.index(close, offsetBy: 2)...]
        } else {
            guard let colon = s.lastIndex(of: ":") else { return nil }
            hostPart = s[..<colon]
            portPart = s[s.index(after: colon)...]
        }
        guard !hostPart.isEmpty, let p = Int(portPart), (0...65535).contains(p) else { return nil }
        host = String(hostPart)
        port = p
    }

    public var description: String { host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)" }
}
