/// Little-endian byte writer for the wire format. Every multi-byte field on the
/// wire is little-endian, written explicitly (never by memory layout).
public struct ByteWriter: Sendable {
    public private(set) var bytes: [UInt8]

    public init(capacity: Int = 64) {
        bytes = []
        bytes.reserveCapacity(capacity)
    }

    public mutating func u8(_ v: UInt8) { bytes.append(v) }
    public mutating func u16(_ v: UInt16) { withUnsafeBytes(of: v.littleEndian) { bytes.append(contentsOf: $0) } }
    public mutating func u32(_ v: UInt32) { withUnsafeBytes(of: v.littleEndian) { bytes.append(contentsOf: $0) } }
    public mutating func u64(_ v: UInt64) { withUnsafeBytes(of: v.littleEndian) { bytes.append(contentsOf: $0) } }
    public mutating func raw(_ v: some Sequence<UInt8>) { bytes.append(contentsOf: v) }
    /// A length-prefixed (u16) UTF-8 string.
    public mutating func string(_ s: String) {
        let utf8 = Array(s.utf8.prefix(Int(UInt16.max)))
        u16(UInt16(utf8.count))
        raw(utf8)
    }
    /// Overwrites a u32 at `offset` (used to patch a frame's length).
    public mutating func patchU32(at offset: Int, _ v: UInt32) {
        withUnsafeBytes(of: v.littleEndian) { src in
            for i in 0..<4 { bytes[offset + i] = src[i] }
        }
    }
}

/// Bounds-checked little-endian reader over borrowed bytes. Every read checks the
/// remaining length first and throws `WireError.truncated` instead of reading past
/// the end.
public struct ByteReader {
    public let buffer: UnsafeRawBufferPointer
    public private(set) var position: Int = 0

    public init(_ buffer: UnsafeRawBufferPointer) { self.buffer = buffer }

    public var remaining: Int { buffer.count - position }

    private mutating func take(_ n: Int, _ field: StaticString) throws(WireError) -> Int {
        guard n >= 0, remaining >= n else { throw .truncated(field: "\(field)", needed: n, available: remaining) }
        defer { position += n }
        return position
    }

    public mutating func u8(_ field: StaticString) throws(WireError) -> UInt8 {
        buffer[try take(1, field)]
    }
    public mutating func u16(_ field: StaticString) throws(WireError) -> UInt16 {
        let p = try take(2, field)
        return UInt16(buffer[p]) | UInt16(buffer[p + 1]) << 8
    }
    public mutating func u32(_ field: StaticString) throws(WireError) -> UInt32 {
        let p = try take(4, field)
        var v: UInt32 = 0
        for i in (0..<4).reversed() { v = v << 8 | UInt32(buffer[p + i]) }
        return v
    }
    public mutating func u64(_ field: StaticString) throws(WireError) -> UInt64 {
        let p = try take(8, field)
        var v: UInt64 = 0
        for i in (0..<8).reversed() { v = v << 8 | UInt64(buffer[p + i]) }
        return v
    }
    /// Borrows `n` bytes without copying.
    public mutating func slice(_ n: Int, _ field: StaticString) throws(WireError) -> UnsafeRawBufferPointer {
        let p = try take(n, field)
        return UnsafeRawBufferPointer(rebasing: buffer[p..<(p + n)])
    }
    public mutating func bytes(_ n: Int, _ field: StaticString) throws(WireError) -> [UInt8] {
        Array(try slice(n, field))
    }
    public mutating func string(_ field: StaticString, maxLength: Int = 4096) throws(WireError) -> String {
        let n = Int(try u16(field))
        guard n <= maxLength else { throw .invalid(field: "\(field)", reason: "string of \(n) bytes exceeds \(maxLength)") }
        let raw = try slice(n, field)
        guard let s = String(validating: raw, as: UTF8.self) else {
            throw .invalid(field: "\(field)", reason: "not valid UTF-8")
        }
        return s
    }
    /// Fails when bytes are left over: every message has an exact length.
    public func expectEnd(_ what: StaticString) throws(WireError) {
        guard remaining == 0 else { throw .invalid(field: "\(what)", reason: "\(remaining) trailing bytes") }
    }
}
