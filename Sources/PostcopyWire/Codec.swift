/// Encodes and decodes messages. Stateless: everything a message means is in it.
public enum Codec {
    /// Encodes a complete frame (header + body).
    public static func encode(_ message: Message) -> [UInt8] {
        var w = ByteWriter(capacity: 64)
        beginFrame(&w, message.type)
        switch message {
        case .hello(let h):
            w.u64(WireProtocol.handshakeMagic)
            w.u16(h.version)
            w.u8(h.role.rawValue)
            w.u64(h.capabilities.rawValue)
            w.u64(h.sessionID)
            encodeExtensions(&w, h.extensions)
        case .welcome(let m):
            w.u64(WireProtocol.handshakeMagic)
            w.u16(m.version)
            w.u32(m.pageSize)
            w.u64(m.sessionID)
            w.u64(m.capabilities.rawValue)
            w.u64(m.digest)
            w.u64(m.deviceStateSize)
            w.u16(UInt16(m.regions.count))
            for r in m.regions {
                w.u64(r.size)
                w.u64(r.sourceOffset)
                w.string(r.name)
            }
            encodeExtensions(&w, m.extensions)
        case .error(let e):
            w.u16(e.code.rawValue)
            w.string(e.message)
        case .pageRequest(let r):
            w.u64(r.requestID)
            w.u16(r.region)
            w.u8(r.pageClass.rawValue)
            w.u64(r.pageOffset)
            w.u32(r.pageCount)
        case .pageData(let h, let payload):
            encodePageDataHeader(&w, h)
            w.raw(payload)
        case .zeroMapRequest(let z):
            w.u16(z.region)
            w.u64(z.firstPage)
            w.u64(z.pageCount)
        case .zeroMap(let z):
            w.u16(z.region)
            w.u64(z.firstPage)
            w.u64(z.pageCount)
            w.raw(z.bits)
        case .deviceStateRequest(let d):
            w.u64(d.offset)
            w.u32(d.maxLength)
        case .deviceState(let d):
            w.u64(d.totalSize)
            w.u64(d.offset)
            w.raw(d.data)
        case .complete(let c):
            w.u64(c.pagesReceived)
            w.u8(c.digest == nil ? 0 : 1)
            w.u64(c.digest ?? 0)
        case .completeAck(let a):
            w.u8(a.digestMatches ? 1 : 0)
            w.u64(a.pagesSentTwice)
        case .pageDigestRequest(let r):
            w.u16(r.region)
            w.u64(r.firstPage)
            w.u32(r.pageCount)
        case .pageDigests(let d):
            w.u16(d.region)
            w.u64(d.firstPage)
            w.u32(UInt32(d.digests.count))
            for x in d.digests { w.u64(x) }
        case .authChallenge(let c):
            w.raw(c.serverNonce.prefix(32))
            w.raw(c.proof.prefix(32))
        case .authResponse(let r):
            w.raw(r.proof.prefix(32))
        case .rdmaRequest:
            break
        case .precopyPassRequest(let p):
            w.u32(p.pass)
        case .dirtySet(let d):
            encodeDirtySet(&w, d)
        case .gatherRequest(let g):
            w.u64(g.firstRequestID)
            w.u8(g.pageClass.rawValue)
            encodeGatherRuns(&w, g.runs)
        case .gatherData(let g, let payload):
            encodeGatherDataHead(&w, g)
            w.raw(payload)
        case .rdmaOffer(let o):
            w.u16(o.port)
            w.raw(o.token.prefix(RDMAOffer.tokenBytes))
            w.u64(o.remoteAddress)
            w.u64(o.length)
            w.u32(o.rkey)
        }
        endFrame(&w)
        return w.bytes
    }

    /// Encodes only the frame header and page-data header of a page response, so a
    /// server can send the payload straight from guest memory (writev, no copy).
    public static func encodePageDataPrefix(_ h: PageDataHeader, payloadLength: Int) -> [UInt8] {
        var w = ByteWriter(capacity: WireProtocol.headerSize + PageDataHeader.encodedSize)
        beginFrame(&w, .pageData)
        encodePageDataHeader(&w, h)
        w.patchU32(at: 4, UInt32(PageDataHeader.encodedSize + payloadLength))
        return w.bytes
    }

    // MARK: - helpers

    private static func beginFrame(_ w: inout ByteWriter, _ type: MessageType) {
        w.u16(WireProtocol.frameMagic)
        w.u8(type.rawValue)
        w.u8(0)
        w.u32(0)  // patched in endFrame
    }

    private static func endFrame(_ w: inout ByteWriter) {
        w.patchU32(at: 4, UInt32(w.bytes.count - WireProtocol.headerSize))
    }

    private static func encodePageDataHeader(_ w: inout ByteWriter, _ h: PageDataHeader) {
        w.u64(h.requestID)
        w.u16(h.region)
        w.u8(h.pageClass.rawValue)
        w.u8((h.isZero ? 1 : 0) | (h.sourcePaused ? 2 : 0))
        w.u64(h.pageOffset)
        w.u32(h.pageCount)
    }

    private static func encodeExtensions(_ w: inout ByteWriter, _ ext: [HandshakeExtension]) {
        w.u16(UInt16(ext.count))
        for e in ext {
            w.u16(e.type)
            w.u16(UInt16(e.value.count))
            w.raw(e.value)
        }
    }
}
