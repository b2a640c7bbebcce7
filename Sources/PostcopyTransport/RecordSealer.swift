import CPostcopy
import PostcopyCore
import PostcopyWire
import Synchronization

/// The sending half of an encrypted connection (`RecordFormat`): takes the
/// frames a send would write (whole frames, split over any number of parts,
/// payloads straight from guest memory), encrypts them into its own buffer in
/// one pass of the cipher, and hands that buffer to the socket each time it
/// fills. One writer at a time (guarded here, since the counter is the nonce).
final class RecordSealer: @unchecked Sendable {
    private let aead: AEADContext
    private let lock = NSLockLite()
    private let out: UnsafeMutableRawPointer
    private let capacity: Int
    private var used = 0
    /// Plaintext bytes sealed so far (read by other threads: metrics).
    private let sealed = Atomic<UInt64>(0)
    var bytesSealed: UInt64 { sealed.load(ordering: .relaxed) }

    /// Ciphertext staged before each write to the socket.
    static let bufferBytes = 256 << 10

    init(key: [UInt8]) throws(TransportError) {
        aead = try AEADContext(key: key, encrypt: true)
        capacity = Self.bufferBytes
        out = UnsafeMutableRawPointer.allocate(byteCount: capacity, alignment: 4096)
    }

    deinit { out.deallocate() }

    /// Seals every frame of `parts` and writes the records with `write` (each
    /// call: a full buffer, or the last of it).
    func seal(_ parts: [UnsafeRawBufferPointer], write: (UnsafeRawBufferPointer) throws(TransportError) -> Void) throws(TransportError) {
        try lock.withLock { () throws(TransportError) in
            var cursor = Cursor(parts: parts.filter { $0.count > 0 })
            used = 0
            while !cursor.atEnd {
                for length in try Self.recordLengths(&cursor) {
                    try record(length, from: &cursor, write: write)
                }
            }
            if used > 0 { try write(UnsafeRawBufferPointer(start: out, count: used)) }
            used = 0
        }
    }

    /// The records of the frame at `cursor`: its headers alone when it carries
    /// pages (a page or gather reply), then the rest.
    static func recordLengths(_ cursor: inout Cursor) throws(TransportError) -> [Int] {
        let head = cursor.peek(WireProtocol.headerSize + max(PageDataHeader.encodedSize, GatherData.fixedSize))
        let header: FrameHeader
        do { header = try head.withUnsafeBytes { (b) throws(WireError) in try FrameHeader.parse(b, maxBody: .max) } } catch {
            throw .protocolViolation("internal: sending a malformed frame (\(error))")
        }
        let total = WireProtocol.headerSize + header.bodyLength
        guard cursor.remaining >= total else { throw .protocolViolation("internal: sending a cut frame (\(cursor.remaining) of \(total) bytes)") }
        var heads = total
        if header.type == .pageData, header.bodyLength > PageDataHeader.encodedSize {
            heads = WireProtocol.headerSize + PageDataHeader.encodedSize
        } else if header.type == .gatherData, head.count >= WireProtocol.headerSize + GatherData.fixedSize,
                  let n = head.withUnsafeBytes({ Codec.gatherDataHeadSize(UnsafeRawBufferPointer(rebasing: $0[WireProtocol.headerSize...])) }),
                  n < header.bodyLength {
            heads = WireProtocol.headerSize + n
        }
        return heads < total ? [heads, total - heads] : [total]
    }

    private func record(_ length: Int, from cursor: inout Cursor, write: (UnsafeRawBufferPointer) throws(TransportError) -> Void) throws(TransportError) {
        try room(RecordFormat.lengthBytes, write)
        let at = out + used
        for i in 0..<RecordFormat.lengthBytes { at.storeBytes(of: UInt8(truncatingIfNeeded: length >> (8 * i)), toByteOffset: i, as: UInt8.self) }
        used += RecordFormat.lengthBytes
        try aead.begin(length: at)
        var left = length
        while left > 0 {
            try room(1, write)
            let chunk = cursor.next(max: min(left, capacity - used))
            try aead.update(out + used, chunk.baseAddress!, chunk.count)
            used += chunk.count
            left -= chunk.count
        }
        try room(RecordFormat.tagBytes, write)
        try aead.seal(tag: out + used)
        used += RecordFormat.tagBytes
        sealed.add(UInt64(length), ordering: .relaxed)
    }

    /// Makes room for `n` bytes, writing out what is staged if needed.
    private func room(_ n: Int, _ write: (UnsafeRawBufferPointer) throws(TransportError) -> Void) throws(TransportError) {
        guard capacity - used < n else { return }
        try write(UnsafeRawBufferPointer(start: out, count: used))
        used = 0
    }

    /// A read position in a list of buffers.
    struct Cursor {
        let parts: [UnsafeRawBufferPointer]
        var part = 0
        var offset = 0
        private(set) var remaining: Int

        init(parts: [UnsafeRawBufferPointer]) {
            self.parts = parts
            remaining = parts.reduce(0) { $0 + $1.count }
        }

        var atEnd: Bool { remaining == 0 }

        /// Up to `n` bytes from here (copied, across parts), without moving.
        func peek(_ n: Int) -> [UInt8] {
            var bytes: [UInt8] = []
            var p = part, o = offset
            while bytes.count < n, p < parts.count {
                let take = min(n - bytes.count, parts[p].count - o)
                bytes += parts[p][o..<(o + take)]
                o += take
                if o == parts[p].count { p += 1; o = 0 }
            }
            return bytes
        }

        /// The next contiguous span of at most `max` bytes; moves past it.
        mutating func next(max: Int) -> UnsafeRawBufferPointer {
            let take = min(max, parts[part].count - offset)
            let span = UnsafeRawBufferPointer(rebasing: parts[part][offset..<(offset + take)])
            offset += take
            remaining -= take
            if offset == parts[part].count { part += 1; offset = 0 }
            return span
        }
    }
}
