// Decoding half of `Codec` (encoding: Codec.swift).
extension Codec {
    /// The page-data header at the start of a pageData frame body (its first
    /// `PageDataHeader.encodedSize` bytes), checked as `decode` checks it; for a
    /// receiver that puts the payload straight into place (the payload length
    /// is the caller's to check: `pageCount` pages, or none when zero).
    public static func decodePageDataHeader(_ bytes: UnsafeRawBufferPointer) throws(WireError) -> PageDataHeader {
        var r = ByteReader(bytes)
        return try decodePageDataHeader(&r)
    }

    static func decodePageDataHeader(_ r: inout ByteReader) throws(WireError) -> PageDataHeader {
        let id = try r.u64("pageData.requestID")
        let region = try r.u16("pageData.region")
        let cls = try pageClass(try r.u8("pageData.class"))
        let flags = try r.u8("pageData.flags")
        guard flags & ~3 == 0 else { throw .invalid(field: "pageData.flags", reason: "unknown bits 0x\(String(flags, radix: 16))") }
        let offset = try r.u64("pageData.pageOffset")
        let count = try r.u32("pageData.pageCount")
        guard count >= 1, count <= WireProtocol.maxPagesPerRequest else {
            throw .invalid(field: "pageData.pageCount", reason: "\(count) pages (1...\(WireProtocol.maxPagesPerRequest) allowed)")
        }
        return PageDataHeader(requestID: id, region: region, pageClass: cls, isZero: flags & 1 != 0, sourcePaused: flags & 2 != 0,
                              pageOffset: offset, pageCount: count)
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
            guard version == WireProtocol.version else { throw .unsupportedVersion(version) }
            let rawRole = try r.u8("hello.role")
            guard let role = ChannelRole(rawValue: rawRole) else { throw .invalid(field: "hello.role", reason: "unknown role \(rawRole)") }
            let caps = Capabilities(rawValue: try r.u64("hello.capabilities"))
            let session = try r.u64("hello.sessionID")
            let ext = try decodeExtensions(&r)
            message = .hello(Hello(role: role, capabilities: caps, sessionID: session, extensions: ext))
        case .welcome:
            try expectMagic(&r)
            let version = try r.u16("welcome.version")
            guard version == WireProtocol.version else { throw .unsupportedVersion(version) }
            let pageSize = try r.u32("welcome.pageSize")
            guard pageSize >= 4096, pageSize <= 1 << 30, pageSize & (pageSize - 1) == 0 else {
                throw .invalid(field: "welcome.pageSize", reason: "\(pageSize) is not a power of two in 4 KiB...1 GiB")
            }
            let session = try r.u64("welcome.sessionID")
            let caps = Capabilities(rawValue: try r.u64("welcome.capabilities"))
            let digest = try r.u64("welcome.digest")
            let devSize = try r.u64("welcome.deviceStateSize")
            let count = Int(try r.u16("welcome.regionCount"))
            guard count >= 1, count <= WireProtocol.maxRegions else {
                throw .invalid(field: "welcome.regionCount", reason: "\(count) regions (1...\(WireProtocol.maxRegions) allowed)")
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
            guard count >= 1, count <= WireProtocol.maxPagesPerRequest else {
                throw .invalid(field: "pageRequest.pageCount", reason: "\(count) pages (1...\(WireProtocol.maxPagesPerRequest) allowed)")
            }
            message = .pageRequest(PageRequest(requestID: id, region: region, pageClass: cls, pageOffset: offset, pageCount: count))
        case .pageData:
            let h = try decodePageDataHeader(&r)
            let expected = h.isZero ? 0 : Int(h.pageCount) * (pageSize ?? 0)
            guard pageSize != nil, r.remaining == expected else {
                throw .invalid(field: "pageData.payload", reason: "\(r.remaining) bytes, expected \(expected)")
            }
            let payload = try r.slice(expected, "pageData.payload")
            message = .pageData(h, payload: payload)
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
        case .precopyPassRequest:
            let pass = try r.u32("precopyPassRequest.pass")
            guard pass >= 1 else { throw .invalid(field: "precopyPassRequest.pass", reason: "passes count from 1") }
            message = .precopyPassRequest(PrecopyPassRequest(pass: pass))
        case .dirtySet:
            message = .dirtySet(try decodeDirtySet(&r))
        case .gatherRequest:
            message = .gatherRequest(try decodeGatherRequest(&r))
        case .gatherData:
            let g = try decodeGatherDataHead(&r)
            let expected = g.payloadBytes(pageSize: pageSize ?? 0)
            guard pageSize != nil, r.remaining == expected else {
                throw .invalid(field: "gatherData.payload", reason: "\(r.remaining) bytes, expected \(expected)")
            }
            message = .gatherData(g, payload: try r.slice(expected, "gatherData.payload"))
        }
        try r.expectEnd("message body")
        return message
    }

    /// Decodes one whole frame from a buffer (header + body), for tests and control paths.
    public static func decodeFrame(_ bytes: UnsafeRawBufferPointer, pageSize: Int?, maxBody: Int = WireProtocol.defaultMaxBody) throws(WireError) -> (Message, consumed: Int) {
        guard bytes.count >= WireProtocol.headerSize else {
            throw .truncated(field: "frame header", needed: WireProtocol.headerSize, available: bytes.count)
        }
        let header = try FrameHeader.parse(bytes, maxBody: maxBody)
        let total = WireProtocol.headerSize + header.bodyLength
        guard bytes.count >= total else { throw .truncated(field: "frame body", needed: header.bodyLength, available: bytes.count - WireProtocol.headerSize) }
        let body = UnsafeRawBufferPointer(rebasing: bytes[WireProtocol.headerSize..<total])
        return (try decode(header, body: body, pageSize: pageSize), total)
    }

    // MARK: - helpers

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
        guard m == WireProtocol.handshakeMagic else {
            throw .invalid(field: "handshake magic", reason: "0x\(String(m, radix: 16)) is not a postcopy handshake")
        }
    }

    static func pageClass(_ raw: UInt8) throws(WireError) -> PageClass {
        guard let c = PageClass(rawValue: raw) else { throw .invalid(field: "page class", reason: "unknown class \(raw)") }
        return c
    }
}
