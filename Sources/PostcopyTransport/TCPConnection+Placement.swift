import CPostcopy
import PostcopyWire
#if canImport(Glibc)
import Glibc
#endif

/// Receiving page payloads straight into place (`PagePlacement`): the headers
/// of a page or gather reply are read alone first, then its payload goes
/// where the placement says, one `recvmsg` over every run's final place.
extension TCPConnection {
    /// Bytes of a frame before its payload, as far as the buffered bytes tell:
    /// a page reply's two headers, or a gather reply's headers and runs.
    func headsLength() -> Int {
        let avail = end - start
        guard avail >= WireProtocol.headerSize + GatherData.fixedSize,
              let f = try? FrameHeader.parse(UnsafeRawBufferPointer(start: buffer + start, count: avail), maxBody: maxBody),
              f.type == .gatherData,
              let n = Codec.gatherDataHeadSize(UnsafeRawBufferPointer(start: buffer + start + WireProtocol.headerSize, count: GatherData.fixedSize))
        else { return Self.pagePrefix }
        return WireProtocol.headerSize + min(n, f.bodyLength)
    }

    /// One recvmsg into the rest of a placed payload's segments (encrypted:
    /// the next plaintext bytes into the first segment not yet full). In
    /// clear, when the request reaches the payload's end, it also asks for up
    /// to `pagePrefix` bytes after it, into the buffer at `end`: the next
    /// frame's headers come with this payload's last bytes instead of in a
    /// recv of their own. The first `pagePrefix` bytes from any frame's start
    /// never hold a page payload (a page reply's headers alone are that long;
    /// a gather reply's are longer), so payloads still never touch the buffer.
    /// Returns the bytes received (the payload's first) and how many were
    /// asked for (fewer came: the socket had no more then).
    func receiveInPlace(_ p: Placed) throws(TransportError) -> (received: Int, asked: Int) {
        if opener != nil {
            var skip = p.got
            for seg in p.segments {
                if skip >= seg.count { skip -= seg.count; continue }
                return (try receive(into: seg.baseAddress! + skip, max: seg.count - skip), .max)
            }
            return (0, .max)
        }
        var skip = p.got
        var iov: [iovec] = []
        var asked = 0, reachesEnd = true
        for (i, seg) in p.segments.enumerated() {
            if skip >= seg.count { skip -= seg.count; continue }
            iov.append(iovec(iov_base: seg.baseAddress! + skip, iov_len: seg.count - skip))
            asked += seg.count - skip
            skip = 0
            if iov.count == 1023 {  // IOV_MAX, with one left for the next headers
                reachesEnd = i == p.segments.count - 1
                break
            }
        }
        let next = min(Self.pagePrefix, capacity - end)
        if reachesEnd, next > 0 {
            iov.append(iovec(iov_base: buffer + end, iov_len: next))
            asked += next
        }
        let r = iov.withUnsafeBufferPointer { cpc_recvv(fd.raw, $0.baseAddress!, Int32($0.count)) }
        if r > 0 { received.add(UInt64(r), ordering: .relaxed) }
        return (r, asked)
    }

    /// The headers of a frame are in (and nothing after them): when it is a
    /// page reply with a payload of exactly its pages and the placement has a
    /// place for it, its payload goes there. Anything else (a malformed header
    /// included) takes the ordinary path, which reports it.
    func place() {
        // Encrypted: only by headers whose record verified.
        guard unverified == 0, let placement, let pageSize,
              let f = try? FrameHeader.parse(UnsafeRawBufferPointer(start: buffer + start, count: end - start), maxBody: maxBody) else { return }
        let heads = end - start
        let body = UnsafeRawBufferPointer(start: buffer + start + WireProtocol.headerSize, count: heads - WireProtocol.headerSize)
        let bytes = f.bodyLength - body.count
        if f.type == .gatherData {
            // Every non-zero run must have its place, or none is used.
            guard let g = try? Codec.decodeGatherDataHead(body), bytes > 0, bytes == g.payloadBytes(pageSize: pageSize) else { return }
            var segments: [UnsafeMutableRawBufferPointer] = []
            for (i, run) in g.runs.enumerated() where !run.isZero {
                let n = Int(run.pageCount) * pageSize
                guard let to = placement.placement(for: g.header(i), payloadBytes: n) else { return }
                segments.append(UnsafeMutableRawBufferPointer(start: to, count: n))
            }
            placed = Placed(reply: .gather(g), prefix: heads, segments: segments, total: bytes)
            return
        }
        guard f.type == .pageData, f.bodyLength > PageDataHeader.encodedSize,
              let h = try? Codec.decodePageDataHeader(body), !h.isZero,
              bytes == Int(h.pageCount) * pageSize, let to = placement.placement(for: h, payloadBytes: bytes) else { return }
        placed = Placed(reply: .page(h), prefix: heads, segments: [UnsafeMutableRawBufferPointer(start: to, count: bytes)], total: bytes)
    }
}
