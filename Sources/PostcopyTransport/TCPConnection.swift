import CPostcopy
import PostcopyCore
import PostcopyWire
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// One non-blocking TCP connection with a frame receive buffer. Reads go into a
/// linear buffer and frames are parsed in place, so a page payload is handed to
/// the installer straight from the receive buffer (one copy: kernel → buffer).
///
/// Not thread-safe for concurrent reads or concurrent writes; one reader thread
/// and one writer thread at a time (the destination's fault thread owns the
/// urgent connection, the background thread owns the main one).
public final class TCPConnection: @unchecked Sendable {
    public let fd: OwnedFD
    public let peer: String
    /// Largest frame body this side accepts.
    public private(set) var maxBody: Int
    // (Internal, not private: `TCPConnection+Placement.swift` reads them.)
    var buffer: UnsafeMutableRawPointer
    var capacity: Int
    var start = 0
    var end = 0
    private let sent = Atomic<UInt64>(0)
    let received = Atomic<UInt64>(0)
    /// Set once the handshake switched this connection to encrypted records
    /// (`startEncryption`, `TCPConnection+Encryption.swift`); nil: frames in clear.
    var sealer: RecordSealer?
    var opener: RecordOpener?
    /// Encrypted: how many bytes at the end of the buffer belong to a record
    /// whose tag has not been checked yet. Frames are parsed only from the
    /// bytes before them.
    var unverified = 0
    /// Page size once the handshake fixed it (makes page payload lengths exact).
    public var pageSize: Int?
    /// Read as much as is there, not one frame at a time: for a side that
    /// receives only small frames (the source's request stream), so a burst of
    /// requests is taken in one recv and answered in one send.
    public var readAhead = false
    /// Where page payloads may be received straight into place (the reader
    /// thread's; not with `readAhead`). Once set, each frame's headers are read
    /// alone first, so no payload byte is ever read into the buffer before the
    /// placement was asked.
    public var placement: PagePlacement?
    /// The page or gather reply whose payload is being received into place:
    /// its headers (`prefix` bytes) wait in the buffer at `start`, its payload
    /// fills `segments` in order (one per non-zero run), `got` of `total`
    /// bytes are in. A cut before the last byte leaves the reply undelivered
    /// (the engine re-requests it; the partial bytes are never mapped).
    var placed: Placed?
    /// In clear: the last recv returned less than it asked for, so the socket
    /// had nothing more then (`tryReceiveMore`). Encrypted, a short plaintext
    /// read says nothing about the socket: never set.
    var drained = false
    struct Placed {
        enum Reply { case page(PageDataHeader), gather(GatherData) }
        var reply: Reply
        var prefix: Int
        var segments: [UnsafeMutableRawBufferPointer]
        var total: Int
        var got = 0
    }
    /// Where the runs of the gather reply just returned by `tryReceive` were
    /// received (one per non-zero run, in order), or nil when its payload is
    /// in the message. Valid until the next call.
    public internal(set) var gatherPlacement: [UnsafeRawBufferPointer]?
    /// Frame header + page-data header.
    static let pagePrefix = WireProtocol.headerSize + PageDataHeader.encodedSize

    public init(fd: Int32, peer: String, maxBody: Int) {
        self.fd = OwnedFD(fd)
        self.peer = peer
        self.maxBody = maxBody
        capacity = Self.frameOrigin + WireProtocol.headerSize + maxBody
        buffer = UnsafeMutableRawPointer.allocate(byteCount: capacity, alignment: 4096)
        start = Self.frameOrigin
        end = Self.frameOrigin
    }

    deinit {
        fd.close()
        buffer.deallocate()
    }

    /// Raises or lowers the frame limit once the handshake fixed the page size;
    /// buffered bytes are kept.
    public func setMaxBody(_ n: Int) {
        let newCapacity = Self.frameOrigin + WireProtocol.headerSize + n
        precondition(end - start <= newCapacity - Self.frameOrigin, "buffered data exceeds the new capacity")
        let nb = UnsafeMutableRawPointer.allocate(byteCount: newCapacity, alignment: 4096)
        nb.copyMemory(from: buffer + start, byteCount: end - start)
        buffer.deallocate()
        buffer = nb
        end = Self.frameOrigin + (end - start)
        start = Self.frameOrigin
        capacity = newCapacity
        maxBody = n
    }

    /// How long `connect` waits for the TCP handshake by default (ms).
    public static let connectTimeoutMs: Int32 = 5_000
    /// How long a send waits for a peer that stopped reading (ms).
    public static let sendStallTimeoutMs: Int32 = 30_000

    public static func connect(_ endpoint: Endpoint, timeoutMs: Int32 = TCPConnection.connectTimeoutMs, maxBody: Int) throws(TransportError) -> TCPConnection {
        var err = [CChar](repeating: 0, count: 256)
        let r = cpc_tcp_connect(endpoint.host, String(endpoint.port), timeoutMs, &err, 256)
        if r < 0 {
            if r == -EHOSTUNREACH, err[0] != 0 {
                throw .system(SystemError("resolve \(endpoint): \(String(decoding: err.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self))", errno: -r))
            }
            throw .system(SystemError("connect to \(endpoint)", errno: -r))
        }
        return TCPConnection(fd: r, peer: endpoint.description, maxBody: maxBody)
    }

    public var bytesSent: UInt64 { sent.load(ordering: .relaxed) }
    public var bytesReceived: UInt64 { received.load(ordering: .relaxed) }

    /// Closes the socket; a thread blocked on it wakes with an error.
    public func shutdown() { _ = cpc_shutdown(fd.raw) }
    public func close() { fd.close() }

    // MARK: sending

    public func send(_ message: Message) throws(TransportError) {
        try send([message])
    }

    /// Sends frames back to back in one write where possible (a burst of requests).
    public func send(_ messages: [Message]) throws(TransportError) {
        var bytes: [UInt8] = []
        for m in messages { bytes += Codec.encode(m) }
        let result: Result<Void, TransportError> = bytes.withUnsafeBytes { raw in
            Result { () throws(TransportError) in try sendv([raw]) }
        }
        try result.get()
    }

    /// Sends `a` then `b` as one write where possible (header + payload from guest memory).
    public func send(_ a: UnsafeRawBufferPointer, _ b: UnsafeRawBufferPointer) throws(TransportError) {
        try sendv([a, b])
    }

    /// Sends the buffers in order, as few sendmsg calls as the kernel allows
    /// (a burst of page replies in one call instead of one each).
    public func sendv(_ parts: [UnsafeRawBufferPointer]) throws(TransportError) {
        guard let sealer else { return try rawSendv(parts) }
        try sealer.seal(parts) { (records) throws(TransportError) in try rawSendv([records]) }
    }

    private func rawSendv(_ parts: [UnsafeRawBufferPointer]) throws(TransportError) {
        var iov = parts.filter { $0.count > 0 }.map { iovec(iov_base: UnsafeMutableRawPointer(mutating: $0.baseAddress), iov_len: $0.count) }
        var first = 0
        while first < iov.count {
            let n = min(iov.count - first, 1024)  // IOV_MAX
            let r = iov.withUnsafeBufferPointer { cpc_sendv(fd.raw, $0.baseAddress! + first, Int32(n)) }
            if r == -Int(EAGAIN) {
                let p = cpc_poll1(fd.raw, Int16(POLLOUT), Self.sendStallTimeoutMs)
                if p < 0 { throw .system(SystemError("poll(send) to \(peer)", errno: -p)) }
                if p == 0 { throw .timedOut("sending to \(peer): peer not reading for \(Self.sendStallTimeoutMs / 1000) s") }
                continue
            }
            if r < 0 {
                if r == -Int(EPIPE) || r == -Int(ECONNRESET) { throw .closed("\(peer) while sending") }
                throw .system(SystemError("send to \(peer)", errno: Int32(-r)))
            }
            sent.add(UInt64(r), ordering: .relaxed)
            var left = r
            while left > 0 {
                if left >= iov[first].iov_len {
                    left -= iov[first].iov_len
                    first += 1
                } else {
                    iov[first].iov_base += left
                    iov[first].iov_len -= left
                    left = 0
                }
            }
        }
    }
}
