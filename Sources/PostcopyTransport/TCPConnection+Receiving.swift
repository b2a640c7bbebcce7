import CPostcopy
import PostcopyCore
import PostcopyWire
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// Receiving: frames parsed from a buffer that holds at most one frame's
/// headers ahead, page payloads received into place where a placement says.
extension TCPConnection {
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

    fileprivate func tryReceive(more: Bool) throws(TransportError) -> Message? {
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

    fileprivate func parseBuffered() throws(TransportError) -> Message? {
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
    fileprivate func fill() throws(TransportError) -> Bool {
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
