/// Why bytes from a peer were rejected. Every case names the field, so an
/// operator reading the log can tell a version mismatch from a hostile peer.
public enum WireError: Error, Equatable, Sendable, CustomStringConvertible {
    case badMagic(UInt16)
    case unknownType(UInt8)
    case oversized(length: Int, limit: Int)
    case truncated(field: String, needed: Int, available: Int)
    case invalid(field: String, reason: String)
    case unsupportedVersion(UInt16)

    public var description: String {
        switch self {
        case .badMagic(let m): return "bad frame magic 0x\(String(m, radix: 16)) (not a postcopy peer?)"
        case .unknownType(let t): return "unknown message type \(t)"
        case .oversized(let l, let limit): return "frame body of \(l) bytes exceeds the limit of \(limit)"
        case .truncated(let f, let n, let a): return "truncated frame: \(f) needs \(n) bytes, \(a) left"
        case .invalid(let f, let r): return "invalid \(f): \(r)"
        case .unsupportedVersion(let v): return "unsupported protocol version \(v) (this build speaks \(WireProtocol.version))"
        }
    }
}
