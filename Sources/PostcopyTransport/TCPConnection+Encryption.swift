import CPostcopy
import PostcopyWire

/// The encrypted stream on a connection (`RecordSealer`, `RecordOpener`):
/// switched on by the handshake, then every send seals and every receive opens.
extension TCPConnection {
    /// Every frame from now on, both ways, travels in AES-256-GCM records
    /// (`RecordFormat`) under `keys`. Called by both sides at the same point of
    /// the handshake, with nothing of the peer's buffered yet.
    public func startEncryption(_ keys: StreamKeys) throws(TransportError) {
        guard start == end, placed == nil else { throw .protocolViolation("\(peer) sent more than its handshake before encryption started") }
        sealer = try RecordSealer(key: keys.send)
        opener = try RecordOpener(key: keys.receive)
    }

    public var isEncrypted: Bool { sealer != nil }
    /// Bytes encrypted (frames sent) and decrypted (frames received) so far.
    public var bytesEncrypted: UInt64 { sealer?.bytesSealed ?? 0 }
    public var bytesDecrypted: UInt64 { opener?.bytesOpened ?? 0 }

    /// One recv, or (encrypted) the next plaintext bytes of the stream, into
    /// `to`: at most `max` bytes, -EAGAIN, 0 at the end, or -errno.
    func receive(into to: UnsafeMutableRawPointer, max: Int) throws(TransportError) -> Int {
        guard let opener else {
            let r = cpc_recv(fd.raw, to, max)
            if r > 0 { received.add(UInt64(r), ordering: .relaxed) }
            return r
        }
        return try opener.read(into: to, max: max, maxRecord: WireProtocol.headerSize + maxBody) { p, n in
            let r = cpc_recv(fd.raw, p, n)
            if r > 0 { received.add(UInt64(r), ordering: .relaxed) }
            return r
        }
    }
}
