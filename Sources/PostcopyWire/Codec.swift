/// The 8-byte frame header: magic u16, type u8, flags u8, body length u32.
public struct FrameHeader: Sendable, Equatable {
    public var type: MessageType
    public var flags: UInt8
    public var bodyLength: Int

    /// Parses and validates a header. Throws on bad magic, unknown type, or a
    /// body longer than `maxBody` (so a hostile length never drives an allocation).
    public static func parse(_ bytes: UnsafeRawBufferPointer, maxBody: Int = Protocol.defaultMaxBody) throws(WireError) -> FrameHeader {
        var r = ByteReader(UnsafeRawBufferPointer(rebasing: bytes.prefix(Protocol.headerSize)))
        let magic = try r.u16("frame magic")
        guard magic == Protocol.frameMagic else { throw .badMagic(magic) }
        let rawType = try r.u8("frame type")
        guard let type = MessageType(rawValue: rawType) else { throw .unknownType(rawType) }
        let flags = try r.u8("frame flags")
        let length = Int(try r.u32("frame length"))
        guard length <= maxBody else { throw .oversized(length: length, limit: maxBody) }
        return FrameHeader(type: type, flags: flags, bodyLength: length)
    }
}

/// Encodes and decodes messages. Stateless: everything a message means is in it.
public enum Codec {
    /// Encodes a complete frame (header + body).
    public static func encode(_ message: Message) -> [UInt8] {
        var w = ByteWriter(capacity: 64)
        beginFrame(&w, message.type)
        switch message {
        case .hello(let h):
            w.u64(Protocol.handshakeMagic)
            w.u16(h.version)
            w.u8(h.role.rawValue)
            w.u64(h.capabilities.rawValue)
            w.u64(h.sessionID)
            encodeExtensions(&w, h.extensions)
        case .welcome(let m):
            w.u64(Protocol.handshakeMagic)
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
        var w = ByteWriter(capacity: Protocol.headerSize + PageDataHeader.encodedSize)
        beginFrame(&w, .pageData)
        encodePageDataHeader(&w, h)
        w.patchU32(at: 4, UInt32(PageDataHeader.encodedSize + payloadLength))
        return w.bytes
    }

    /// Decodes a frame body of the given type. `pageSize` (once known from the
    /// handshake) makes page payload lengths exact.
    public static func decode(_ header: FrameHeader, body: UnsafeRawBufferPointer, pageSize: Int?) throws(WireError) -> Message {
        guard body.count == header.bodyLength else {
            throw .truncated(field: "frame body", needed: header.bodyLength, available: body.count)
        }
        var r = ByteReader(body)
        let message: Message
        switch header.type {
        case .hello:
            try expectMagic(&r)
            let version = try r.u16("hello.version")
            guard version == Protocol.version else { throw .unsupportedVersion(version) }
            let rawRole = try r.u8("hello.role")
            guard let role = ChannelRole(rawValue: rawRole) else { throw .invalid(field: "hello.role", reason: "unknown role \(rawRole)") }
            let caps = Capabilities(rawValue: try r.u64("hello.capabilities"))
            let session = try r.u64("hello.sessionID")
            let ext = try decodeExtensions(&r)
            message = .hello(Hello(role: role, capabilities: caps, sessionID: session, extensions: ext))
        case .welcome:
            try expectMagic(&r)
            let version = try r.u16("welcome.version")
            guard version == Protocol.version else { throw .unsupportedVersion(version) }
            let pageSize = try r.u32("welcome.pageSize")
            guard pageSize >= 4096, pageSize <= 1 << 30, pageSize & (pageSize - 1) == 0 else {
                throw .invalid(field: "welcome.pageSize", reason: "\(pageSize) is not a power of two in 4 KiB...1 GiB")
            }
            let session = try r.u64("welcome.sessionID")
            let caps = Capabilities(rawValue: try r.u64("welcome.capabilities"))
            let digest = try r.u64("welcome.digest")
            let devSize = try r.u64("welcome.deviceStateSize")
            let count = Int(try r.u16("welcome.regionCount"))
            guard count >= 1, count <= Protocol.maxRegions else {
                throw .invalid(field: "welcome.regionCount", reason: "\(count) regions (1...\(Protocol.maxRegions) allowed)")
            }
            var regions: [RegionDescriptor] = []
            for _ in 0..<count {
                let size = try r.u64("region.size")
                let offset = try r.u64("region.sourceOffset")
                let name = try r.string("region.name", maxLength: 256)
                guard size > 0, size % UInt64(pageSize) == 0 else {
                    throw .invalid(field: "region.size", reason: "\(size) is not a positive multiple of the page size \(pageSize)")
                }
                guard offset.addingReportingOverflow(size).overflow == false else {
                    throw .invalid(field: "region.sourceOffset", reason: "offset + size overflows")
                }
                regions.append(RegionDescriptor(size: size, sourceOffset: offset, name: name))
            }
            let ext = try decodeExtensions(&r)
            message = .welcome(Welcome(pageSize: pageSize, sessionID: session, capabilities: caps, regions: regions,
                                       digest: digest, deviceStateSize: devSize, extensions: ext))
        case .error:
            let raw = try r.u16("error.code")
            let code = ErrorCode(rawValue: raw) ?? .protocolViolation
            message = .error(ErrorMessage(code: code, message: try r.string("error.message")))
        case .pageRequest:
            let id = try r.u64("pageRequest.requestID")
            let region = try r.u16("pageRequest.region")
            let cls = try pageClass(try r.u8("pageRequest.class"))
            let offset = try r.u64("pageRequest.pageOffset")
            let count = try r.u32("pageRequest.pageCount")
            guard count >= 1, count <= Protocol.maxPagesPerRequest else {
                throw .invalid(field: "pageRequest.pageCount", reason: "\(count) pages (1...\(Protocol.maxPagesPerRequest) allowed)")
            }
            message = .pageRequest(PageRequest(requestID: id, region: region, pageClass: cls, pageOffset: offset, pageCount: count))
        case .pageData:
            let id = try r.u64("pageData.requestID")
            let region = try r.u16("pageData.region")
            let cls = try pageClass(try r.u8("pageData.class"))
            let flags = try r.u8("pageData.flags")
            guard flags & ~1 == 0 else { throw .invalid(field: "pageData.flags", reason: "unknown bits 0x\(String(flags, radix: 16))") }
            let offset = try r.u64("pageData.pageOffset")
            let count = try r.u32("pageData.pageCount")
            guard count >= 1, count <= Protocol.maxPagesPerRequest else {
                throw .invalid(field: "pageData.pageCount", reason: "\(count) pages (1...\(Protocol.maxPagesPerRequest) allowed)")
            }
            let isZero = flags & 1 != 0
            let expected = isZero ? 0 : Int(count) * (pageSize ?? 0)
            guard pageSize != nil, r.remaining == expected else {
                throw .invalid(field: "pageData.payload", reason: "\(r.remaining) bytes, expected \(expected)")
            }
            let payload = try r.slice(expected, "pageData.payload")
            message = .pageData(PageDataHeader(requestID: id, region: region, pageClass: cls, isZero: isZero,
                                               pageOffset: offset, pageCount: count), payload: payload)
        case .zeroMapRequest:
            message = .zeroMapRequest(ZeroMapRequest(region: try r.u16("zeroMapRequest.region"),
                                                     firstPage: try r.u64("zeroMapRequest.firstPage"),
                                                     pageCount: try r.u64("zeroMapRequest.pageCount")))
        case .zeroMap:
            let region = try r.u16("zeroMap.region")
            let first = try r.u64("zeroMap.firstPage")
            let count = try r.u64("zeroMap.pageCount")
            guard count <= UInt64(r.remaining) * 8, (count + 7) / 8 == UInt64(r.remaining) else {
                throw .invalid(field: "zeroMap.bits", reason: "\(r.remaining) bytes for \(count) pages")
            }
            message = .zeroMap(ZeroMap(region: region, firstPage: first, pageCount: count, bits: try r.bytes(r.remaining, "zeroMap.bits")))
        case .deviceStateRequest:
            message = .deviceStateRequest(DeviceStateRequest(offset: try r.u64("deviceStateRequest.offset"),
                                                             maxLength: try r.u32("deviceStateRequest.maxLength")))
        case .deviceState:
            let total = try r.u64("deviceState.totalSize")
            let offset = try r.u64("deviceState.offset")
            guard offset <= total, UInt64(r.remaining) <= total - offset else {
                throw .invalid(field: "deviceState", reason: "chunk at \(offset)+\(r.remaining) beyond total \(total)")
            }
            message = .deviceState(DeviceState(totalSize: total, offset: offset, data: try r.bytes(r.remaining, "deviceState.data")))
        case .complete:
            let pages = try r.u64("complete.pagesReceived")
            let has = try r.u8("complete.hasDigest")
            guard has <= 1 else { throw .invalid(field: "complete.hasDigest", reason: "\(has)") }
            let digest = try r.u64("complete.digest")
            message = .complete(Complete(pagesReceived: pages, digest: has == 1 ? digest : nil))
        case .completeAck:
            let m = try r.u8("completeAck.digestMatches")
            guard m <= 1 else { throw .invalid(field: "completeAck.digestMatches", reason: "\(m)") }
            message = .completeAck(CompleteAck(digestMatches: m == 1, pagesSentTwice: try r.u64("completeAck.pagesSentTwice")))
        case .pageDigestRequest:
            let region = try r.u16("pageDigestRequest.region")
            let first = try r.u64("pageDigestRequest.firstPage")
            let count = try r.u32("pageDigestRequest.pageCount")
            guard count >= 1, count <= PageDigests.maxPages else {
                throw .invalid(field: "pageDigestRequest.pageCount", reason: "\(count) pages (1...\(PageDigests.maxPages) allowed)")
            }
            message = .pageDigestRequest(PageDigestRequest(region: region, firstPage: first, pageCount: count))
        case .pageDigests:
            let region = try r.u16("pageDigests.region")
            let first = try r.u64("pageDigests.firstPage")
            let count = try r.u32("pageDigests.count")
            guard count <= PageDigests.maxPages, r.remaining == Int(count) * 8 else {
                throw .invalid(field: "pageDigests", reason: "\(r.remaining) bytes for \(count) digests")
            }
            var d: [UInt64] = []
            d.reserveCapacity(Int(count))
            for _ in 0..<count { d.append(try r.u64("pageDigests.digest")) }
            message = .pageDigests(PageDigests(region: region, firstPage: first, digests: d))
        case .authChallenge:
            message = .authChallenge(AuthChallenge(serverNonce: try r.bytes(32, "authChallenge.serverNonce"),
                                                   proof: try r.bytes(32, "authChallenge.proof")))
        case .authResponse:
            message = .authResponse(AuthResponse(proof: try r.bytes(32, "authResponse.proof")))
        case .rdmaRequest:
            message = .rdmaRequest(RDMARequest())
        case .rdmaOffer:
            let port = try r.u16("rdmaOffer.port")
            let token = try r.bytes(RDMAOffer.tokenBytes, "rdmaOffer.token")
            let address = try r.u64("rdmaOffer.remoteAddress")
            let length = try r.u64("rdmaOffer.length")
            guard length > 0, address <= UInt64.max - length else {
                throw .invalid(field: "rdmaOffer.length", reason: "\(length) bytes at \(address)")
            }
            message = .rdmaOffer(RDMAOffer(port: port, token: token, remoteAddress: address, length: length, rkey: try r.u32("rdmaOffer.rkey")))
        }
        try r.expectEnd("message body")
        return message
    }

    /// Decodes one whole frame from a buffer (header + body), for tests and control paths.
    public static func decodeFrame(_ bytes: UnsafeRawBufferPointer, pageSize: Int?, maxBody: Int = Protocol.defaultMaxBody) throws(WireError) -> (Message, consumed: Int) {
        guard bytes.count >= Protocol.headerSize else {
            throw .truncated(field: "frame header", needed: Protocol.headerSize, available: bytes.count)
        }
        let header = try FrameHeader.parse(bytes, maxBody: maxBody)
        let total = Protocol.headerSize + header.bodyLength
        guard bytes.count >= total else { throw .truncated(field: "frame body", needed: header.bodyLength, available: bytes.count - Protocol.headerSize) }
        let body = UnsafeRawBufferPointer(rebasing: bytes[Protocol.headerSize..<total])
        return (try decode(header, body: body, pageSize: pageSize), total)
    }

    // MARK: - helpers

    private static func beginFrame(_ w: inout ByteWriter, _ type: MessageType) {
        w.u16(Protocol.frameMagic)
        w.u8(type.rawValue)
        w.u8(0)
        w.u32(0)  // patched in endFrame
    }

    private static func endFrame(_ w: inout ByteWriter) {
        w.patchU32(at: 4, UInt32(w.bytes.count - Protocol.headerSize))
    }

    private static func encodePageDataHeader(_ w: inout ByteWriter, _ h: PageDataHeader) {
        w.u64(h.requestID)
        w.u16(h.region)
        w.u8(h.pageClass.rawValue)
        w.u8(h.isZero ? 1 : 0)
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

    private static func decodeExtensions(_ r: inout ByteReader) throws(WireError) -> [HandshakeExtension] {
        let count = Int(try r.u16("extensions.count"))
        guard count <= 64 else { throw .invalid(field: "extensions.count", reason: "\(count) extensions (64 allowed)") }
        var out: [HandshakeExtension] = []
        for _ in 0..<count {
            let type = try r.u16("extension.type")
            let len = Int(try r.u16("extension.length"))
            out.append(HandshakeExtension(type: type, value: try r.bytes(len, "extension.value")))
        }
        return out
    }

    private static func expectMagic(_ r: inout ByteReader) throws(WireError) {
        let m = try r.u64("handshake magic")
        guard m == Protocol.handshakeMagic else {
            throw .invalid(field: "handshake magic", reason: "0x\(String(m, radix: 16)) is not a postcopy handshake")
        }
    }

    private static func pageClass(_ raw: UInt8) throws(WireError) -> PageClass {
        guard let c = PageClass(rawValue: raw) else { throw .invalid(field: "page class", reason: "unknown class \(raw)") }
        return c
    }
}

/// The region table both sides agree on in the handshake; validates page ranges
/// so no request or response can address memory outside a region.
public struct RegionTable: Sendable, Equatable {
    public let pageSize: Int
    public let regions: [RegionDescriptor]
    /// Index of each region's first page in a global page numbering.
    public let firstGlobalPage: [Int]
    public let totalPages: Int

    public init(pageSize: Int, regions: [RegionDescriptor]) {
        self.pageSize = pageSize
        self.regions = regions
        var first: [Int] = []
        var total = 0
        for r in regions {
            first.append(total)
            total += Int(r.size) / pageSize
        }
        firstGlobalPage = first
        totalPages = total
    }

    public func pageCount(region: Int) -> Int { Int(regions[region].size) / pageSize }

    /// Throws unless [pageOffset, pageOffset + count) lies inside `region`.
    public func validate(region: UInt16, pageOffset: UInt64, pageCount: UInt64) throws(WireError) {
        guard Int(region) < regions.count else {
            throw .invalid(field: "region", reason: "region \(region) does not exist (\(regions.count) regions)")
        }
        let pages = UInt64(self.pageCount(region: Int(region)))
        let (end, overflow) = pageOffset.addingReportingOverflow(pageCount)
        guard !overflow, pageCount > 0, end <= pages else {
            throw .invalid(field: "page range", reason: "pages \(pageOffset)..<\(pageOffset &+ pageCount) outside region \(region) of \(pages) pages")
        }
    }

    /// Maps a global page number to (region, page offset).
    public func locate(globalPage: Int) -> (region: Int, page: Int) {
        var lo = 0, hi = regions.count - 1
        while lo < hi {
            let mid = (lo + hi + 1) / 2
            if firstGlobalPage[mid] <= globalPage { lo = mid } else { hi = mid - 1 }
        }
        return (lo, globalPage - firstGlobalPage[lo])
    }
}
