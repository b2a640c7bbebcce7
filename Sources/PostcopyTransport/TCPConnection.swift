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
    public private(set) var gatherPlacement: [UnsafeRawBufferPointer]?
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

    // MARK: receiving

    /// Returns the next complete frame if one is buffered or readable now, else nil.
    /// The returned message (and any payload it borrows) is valid until the next call.
    public func tryReceive() throws(TransportError) -> Message? {
        try tryReceive(more: false)
    }

    /// `tryReceive` right after it returned a frame, in the same loop (no wait
    /// since): nil without a recv when the last recv came back short, since it
    /// would only say EAGAIN. Bytes that came in meanwhile keep the descriptor
    /// readable for the caller's (level-triggered) poll.
    public func tryReceiveMore() throws(TransportError) -> Message? {
        try tryReceive(more: true)
    }

    private func tryReceive(more: Bool) throws(TransportError) -> Message? {
        while true {
            if let m = try parseBuffered() { return m }
            if more && drained { return nil }
            if try fill() == false { return nil }
        }
    }

    /// Longest single poll of a `receive` (ms): it waits in slices of this.
    static let receivePollSliceMs: Int32 = 1000

    /// Blocks (up to `timeoutMs`, -1 forever) for the next frame.
    public func receive(timeoutMs: Int32 = -1) throws(TransportError) -> Message {
        let deadline = timeoutMs < 0 ? UInt64.max : nowNanoseconds() + UInt64(timeoutMs) * 1_000_000
        while true {
            if let m = try tryReceive() { return m }
            let now = nowNanoseconds()
            guard now < deadline else { throw .timedOut("waiting for a frame from \(peer)") }
            let slice = UInt64(Self.receivePollSliceMs)
            let wait = deadline == .max ? Self.receivePollSliceMs : Int32(min(slice, (deadline - now) / 1_000_000 + 1))
            let p = cpc_poll1(fd.raw, Int16(POLLIN), wait)
            if p < 0 { throw .system(SystemError("poll(recv) from \(peer)", errno: -p)) }
        }
    }

    private func parseBuffered() throws(TransportError) -> Message? {
        gatherPlacement = nil
        if let p = placed {
            guard p.got == p.total else { return nil }
            // The sender ends a payload's record with the payload: a payload
            // that is all in while its record goes on is not the sender's.
            if let opener, !opener.atBoundary { throw .integrity("a payload ends inside an encrypted record (its length was changed on the way)") }
            placed = nil
            start += p.prefix
            switch p.reply {
            case .page(let h): return .pageData(h, payload: UnsafeRawBufferPointer(p.segments[0]))
            case .gather(let g):
                gatherPlacement = p.segments.map { UnsafeRawBufferPointer($0) }
                return .gatherData(g, payload: UnsafeRawBufferPointer(start: nil, count: 0))
            }
        }
        let avail = end - unverified - start
        guard avail >= WireProtocol.headerSize else { return nil }
        let header: FrameHeader
        do {
            header = try FrameHeader.parse(UnsafeRawBufferPointer(start: buffer + start, count: avail), maxBody: maxBody)
        } catch { throw .wire(error) }
        let total = WireProtocol.headerSize + header.bodyLength
        guard avail >= total else { return nil }
        let body = UnsafeRawBufferPointer(start: buffer + start + WireProtocol.headerSize, count: header.bodyLength)
        start += total
        do {
            let m = try Codec.decode(header, body: body, pageSize: pageSize)
            if case .error(let e) = m { throw TransportError.peer(e) }
            return m
        } catch let e as WireError {
            throw .wire(e)
        } catch let e as TransportError {
            throw e
        } catch {
            throw .protocolViolation("\(error)")
        }
    }

    /// Where a frame starts in the buffer: 32 bytes (frame header + page-data
    /// header) before a page boundary, so page payloads land page-aligned.
    /// UFFDIO_COPY then copies whole cache lines from an aligned source.
    static let frameOrigin = 4096 - (WireProtocol.headerSize + PageDataHeader.encodedSize)

    /// Reads from the socket without running past the current frame once its
    /// length is known, and at most one page reply's worth before that; so the
    /// buffer is (nearly) always empty between frames and each frame starts at
    /// `frameOrigin`. Returns false when the socket would block.
    private func fill() throws(TransportError) -> Bool {
        if var p = placed {
            let (r, asked) = try receiveInPlace(p)
            guard try received(r) else { return false }
            drained = opener == nil && r < asked
            // Past the payload: the next frame's first bytes, into the buffer.
            let payload = min(r, p.total - p.got)
            end += r - payload
            p.got += payload
            placed = p
            return true
        }
        if start == end {
            start = Self.frameOrigin
            end = Self.frameOrigin
        } else if start != Self.frameOrigin {
            // A few bytes of the next frame were read with the previous one.
            (buffer + Self.frameOrigin).copyMemory(from: buffer + start, byteCount: end - start)
            end = Self.frameOrigin + (end - start)
            start = Self.frameOrigin
        }
        let avail = end - start
        var want = WireProtocol.headerSize + PageDataHeader.encodedSize + (pageSize ?? 4096)
        if avail >= WireProtocol.headerSize,
           let h = try? FrameHeader.parse(UnsafeRawBufferPointer(start: buffer + start, count: avail), maxBody: maxBody) {
            want = WireProtocol.headerSize + h.bodyLength
        }
        let placing = placement != nil && !readAhead
        // Headers that came with the previous payload (`receiveInPlace`): placed before any read.
        if placing, avail > 0, avail == headsLength() {
            place()
            if placed != nil { return true }
        }
        if placing && avail < headsLength() { want = headsLength() }  // the headers alone first
        let room = readAhead ? capacity - end : min(capacity - end, max(want - avail, 1))
        // (Full, with a frame in it: in clear it would have parsed; encrypted,
        // its record goes on past it, which no sender of this protocol does.)
        guard room > 0 else { throw .integrity("a frame ends inside an encrypted record (its length was changed on the way)") }
        let r = try receive(into: buffer + end, max: room)
        guard try received(r) else { return false }
        drained = opener == nil && r < room
        end += r
        if let opener { unverified = opener.atBoundary ? 0 : unverified + r }
        if placing && end - start == headsLength() { place() }
        return true
    }

    /// Maps the result of one `receive`; false when it would block.
    func received(_ r: Int) throws(TransportError) -> Bool {
        if r == -Int(EAGAIN) { return false }
        if r == 0 { throw .closed(opener?.isMidRecord == true ? "\(peer) (in the middle of an encrypted record)" : peer) }
        if r < 0 {
            if r == -Int(ECONNRESET) { throw .closed("\(peer) (connection reset)") }
            throw .system(SystemError("recv from \(peer)", errno: Int32(-r)))
        }
        return true
    }

}
