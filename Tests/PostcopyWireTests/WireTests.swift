import Testing
@testable import PostcopyWire

/// Encodes, then decodes the whole frame; returns the decoded message.
private func roundTrip(_ m: Message, pageSize: Int? = 4096) throws -> Message {
    let bytes = Codec.encode(m)
    return try bytes.withUnsafeBytes { raw in
        let (decoded, consumed) = try Codec.decodeFrame(raw, pageSize: pageSize)
        #expect(consumed == bytes.count)
        return decoded
    }
}

private func decodeBytes(_ bytes: [UInt8], pageSize: Int? = 4096, maxBody: Int = WireProtocol.defaultMaxBody) throws(WireError) -> Message {
    let r: Result<Message, WireError> = bytes.withUnsafeBytes { raw in
        Result { () throws(WireError) in try Codec.decodeFrame(raw, pageSize: pageSize, maxBody: maxBody).0 }
    }
    return try r.get()
}

private let sampleWelcome = Welcome(
    pageSize: 4096, sessionID: 0xDEAD_BEEF_0000_0001, capabilities: [.zeroMap, .urgentChannel],
    regions: [RegionDescriptor(size: 1 << 20, sourceOffset: 0, name: "ram0"),
              RegionDescriptor(size: 8192, sourceOffset: 1 << 20, name: "ram1")],
    digest: 0x0123_4567_89AB_CDEF, deviceStateSize: 77,
    extensions: [HandshakeExtension(type: 9, value: [1, 2, 3])])

private let samplePage: [UInt8] = (0..<8192).map { UInt8(truncatingIfNeeded: $0 &* 31) }

/// One valid frame of every message type.
private func allSampleFrames() -> [[UInt8]] {
    samplePage.withUnsafeBytes { page in
        [
            Codec.encode(.hello(Hello(role: .urgent, capabilities: [.zeroMap], sessionID: 42,
                                      extensions: [HandshakeExtension(type: 1, value: [7])]))),
            Codec.encode(.welcome(sampleWelcome)),
            Codec.encode(.error(ErrorMessage(code: .outOfRange, message: "nope"))),
            Codec.encode(.pageRequest(PageRequest(requestID: 5, region: 1, pageClass: .prefetch, pageOffset: 1, pageCount: 1))),
            Codec.encode(.pageData(PageDataHeader(requestID: 5, region: 0, pageClass: .background, isZero: false,
                                                  pageOffset: 3, pageCount: 2), payload: page)),
            Codec.encode(.pageData(PageDataHeader(requestID: 6, region: 0, pageClass: .demand, isZero: true,
                                                  pageOffset: 3, pageCount: 9), payload: UnsafeRawBufferPointer(start: nil, count: 0))),
            Codec.encode(.zeroMapRequest(ZeroMapRequest(region: 0, firstPage: 8, pageCount: 17))),
            Codec.encode(.zeroMap(ZeroMap(region: 0, firstPage: 8, pageCount: 17, bits: [0xFF, 0x00, 0x01]))),
            Codec.encode(.deviceStateRequest(DeviceStateRequest(offset: 3, maxLength: 100))),
            Codec.encode(.deviceState(DeviceState(totalSize: 10, offset: 4, data: [1, 2, 3]))),
            Codec.encode(.complete(Complete(pagesReceived: 99, digest: 1234))),
            Codec.encode(.complete(Complete(pagesReceived: 99, digest: nil))),
            Codec.encode(.completeAck(CompleteAck(digestMatches: true, pagesSentTwice: 0))),
            Codec.encode(.pageDigestRequest(PageDigestRequest(region: 0, firstPage: 4, pageCount: 3))),
            Codec.encode(.pageDigests(PageDigests(region: 0, firstPage: 4, digests: [1, 2, .max]))),
            Codec.encode(.authChallenge(AuthChallenge(serverNonce: [UInt8](repeating: 7, count: 32), proof: [UInt8](repeating: 9, count: 32)))),
            Codec.encode(.authResponse(AuthResponse(proof: [UInt8](repeating: 3, count: 32)))),
            Codec.encode(.rdmaRequest(RDMARequest())),
            Codec.encode(.rdmaOffer(RDMAOffer(port: 4791, token: [UInt8](repeating: 5, count: 16), remoteAddress: 0x7f00_0000_0000,
                                              length: 1 << 30, rkey: 0x1234))),
            Codec.encode(.precopyPassRequest(PrecopyPassRequest(pass: 1))),
            Codec.encode(.dirtySet(DirtySet(pass: 1, isFinal: false, isLastChunk: true, firstPage: 0, pageCount: 1000,
                                            runs: [0..<10, 500..<501]))),
            Codec.encode(.gatherRequest(GatherRequest(firstRequestID: 3, pageClass: .background,
                                                      runs: [GatherRun(region: 0, pageOffset: 5, pageCount: 1), GatherRun(region: 1, pageOffset: 0, pageCount: 2)]))),
            Codec.encode(.gatherData(GatherData(firstRequestID: 3, pageClass: .background, sourcePaused: true,
                                                runs: [GatherRun(region: 0, pageOffset: 5, pageCount: 2), GatherRun(region: 1, pageOffset: 0, pageCount: 2, isZero: true)]),
                                     payload: page)),
        ]
    }
}

@Suite("wire codec")
struct WireCodecTests {
    @Test func helloRoundTrip() throws {
        let h = Hello(role: .main, capabilities: [.zeroMap, .urgentChannel], sessionID: 7,
                      extensions: [HandshakeExtension(type: 3, value: [9, 9])])
        guard case .hello(let d) = try roundTrip(.hello(h)) else { Issue.record("not hello"); return }
        #expect(d == h)
    }

    @Test func welcomeRoundTrip() throws {
        guard case .welcome(let d) = try roundTrip(.welcome(sampleWelcome)) else { Issue.record("not welcome"); return }
        #expect(d == sampleWelcome)
    }

    @Test func pageRequestRoundTrip() throws {
        let r = PageRequest(requestID: .max, region: 3, pageClass: .background, pageOffset: 1 << 40, pageCount: 4096)
        guard case .pageRequest(let d) = try roundTrip(.pageRequest(r)) else { Issue.record("not a request"); return }
        #expect(d == r)
    }

    @Test func pageDataCarriesPayloadExactly() throws {
        let bytes = samplePage.withUnsafeBytes { page in
            Codec.encode(.pageData(PageDataHeader(requestID: 1, region: 0, pageClass: .demand, isZero: false,
                                                  pageOffset: 10, pageCount: 2), payload: page))
        }
        try bytes.withUnsafeBytes { raw in
            let (m, _) = try Codec.decodeFrame(raw, pageSize: 4096)
            guard case .pageData(let h, let payload) = m else { Issue.record("not page data"); return }
            #expect(h.pageOffset == 10 && h.pageCount == 2 && !h.isZero)
            #expect(Array(payload) == samplePage)
        }
    }

    @Test func prefixMatchesFullEncoding() {
        let h = PageDataHeader(requestID: 9, region: 1, pageClass: .background, isZero: false, pageOffset: 5, pageCount: 2)
        let full = samplePage.withUnsafeBytes { Codec.encode(.pageData(h, payload: $0)) }
        let prefix = Codec.encodePageDataPrefix(h, payloadLength: samplePage.count)
        #expect(prefix + samplePage == full)
        #expect(prefix.count == WireProtocol.headerSize + PageDataHeader.encodedSize)
    }

    @Test func littleEndianOnTheWire() {
        let bytes = Codec.encode(.complete(Complete(pagesReceived: 0x0102_0304_0506_0708, digest: 0)))
        // header: magic "PC" = 0x4350 little-endian, type 10, flags 0, length 17
        #expect(Array(bytes[0..<8]) == [0x50, 0x43, 10, 0, 17, 0, 0, 0])
        #expect(Array(bytes[8..<16]) == [8, 7, 6, 5, 4, 3, 2, 1])
    }

    @Test func everyTruncationIsRejected() {
        for frame in allSampleFrames() {
            for n in 0..<frame.count {
                #expect(throws: WireError.self) { _ = try decodeBytes(Array(frame[0..<n])) }
            }
            #expect(throws: Never.self) { _ = try decodeBytes(frame) }
        }
    }

    @Test func trailingBytesInABodyAreRejected() {
        var frame = Codec.encode(.complete(Complete(pagesReceived: 1, digest: 2)))
        frame.append(0)
        frame[4] += 1  // length now covers the extra byte
        #expect(throws: WireError.invalid(field: "message body", reason: "1 trailing bytes")) { _ = try decodeBytes(frame) }
    }

    @Test func oversizedLengthIsRejectedBeforeReadingTheBody() {
        var frame = Codec.encode(.complete(Complete(pagesReceived: 1, digest: 2)))
        frame[4] = 0xFF; frame[5] = 0xFF; frame[6] = 0xFF; frame[7] = 0x7F
        #expect(throws: WireError.oversized(length: 0x7FFF_FFFF, limit: 1 << 20)) { _ = try decodeBytes(frame, maxBody: 1 << 20) }
    }

    @Test func badMagicUnknownTypeAndVersion() {
        var frame = Codec.encode(.hello(Hello(role: .main, capabilities: [], sessionID: 0)))
        var bad = frame
        bad[0] = 0x00
        #expect(throws: WireError.badMagic(0x4300)) { _ = try decodeBytes(bad) }
        bad = frame
        bad[2] = 200
        #expect(throws: WireError.unknownType(200)) { _ = try decodeBytes(bad) }
        frame[16] = 99  // version (after 8-byte header and 8-byte handshake magic)
        #expect(throws: WireError.unsupportedVersion(99)) { _ = try decodeBytes(frame) }
    }

    @Test func pagePayloadLengthMustMatchCount() {
        // A frame claiming 3 pages but carrying 2.
        var frame = samplePage.withUnsafeBytes {
            Codec.encode(.pageData(PageDataHeader(requestID: 1, region: 0, pageClass: .demand, isZero: false,
                                                  pageOffset: 0, pageCount: 2), payload: $0))
        }
        frame[8 + 8 + 2 + 1 + 1 + 8] = 3
        #expect(throws: WireError.self) { _ = try decodeBytes(frame) }
        // Without a page size from the handshake, page data is refused.
        let ok = samplePage.withUnsafeBytes {
            Codec.encode(.pageData(PageDataHeader(requestID: 1, region: 0, pageClass: .demand, isZero: false,
                                                  pageOffset: 0, pageCount: 2), payload: $0))
        }
        #expect(throws: WireError.self) { _ = try decodeBytes(ok, pageSize: nil) }
    }

    @Test func pageCountBounds() {
        for count: UInt32 in [0, WireProtocol.maxPagesPerRequest + 1] {
            let frame = Codec.encode(.pageRequest(PageRequest(requestID: 1, region: 0, pageClass: .demand, pageOffset: 0, pageCount: count)))
            #expect(throws: WireError.self) { _ = try decodeBytes(frame) }
        }
    }

    @Test func welcomeRejectsBadTables() {
        var w = sampleWelcome
        w.pageSize = 5000
        #expect(throws: WireError.self) { _ = try decodeBytes(Codec.encode(.welcome(w))) }
        w = sampleWelcome
        w.regions = [RegionDescriptor(size: 4097, sourceOffset: 0, name: "odd")]
        #expect(throws: WireError.self) { _ = try decodeBytes(Codec.encode(.welcome(w))) }
        w.regions = [RegionDescriptor(size: 4096, sourceOffset: .max - 10, name: "wraps")]
        #expect(throws: WireError.self) { _ = try decodeBytes(Codec.encode(.welcome(w))) }
        w.regions = []
        #expect(throws: WireError.self) { _ = try decodeBytes(Codec.encode(.welcome(w))) }
    }

    @Test func invalidUTF8IsRejected() {
        var frame = Codec.encode(.error(ErrorMessage(code: .internalError, message: "ab")))
        frame[frame.count - 1] = 0xFF
        #expect(throws: WireError.self) { _ = try decodeBytes(frame) }
    }

    @Test func deviceStateChunkMustFitTotal() {
        let frame = Codec.encode(.deviceState(DeviceState(totalSize: 2, offset: 1, data: [1, 2])))
        #expect(throws: WireError.self) { _ = try decodeBytes(frame) }
    }

    /// Random garbage and random mutations of valid frames: the decoder must
    /// either decode or throw, never trap or read out of bounds (ASan/UBSan in CI
    /// would catch an out-of-bounds read; Swift traps on one here).
    @Test func garbageAndMutationsNeverCrash() {
        var rng = SplitMix(seed: 0xC0FFEE)
        let frames = allSampleFrames()
        var decoded = 0, rejected = 0
        for i in 0..<20_000 {
            var bytes: [UInt8]
            if i % 4 == 0 {
                bytes = (0..<Int(rng.next() % 96)).map { _ in UInt8(truncatingIfNeeded: rng.next()) }
                if bytes.count >= 2 { bytes[0] = 0x50; bytes[1] = 0x43 }
            } else {
                bytes = frames[Int(rng.next() % UInt64(frames.count))]
                for _ in 0..<(1 + Int(rng.next() % 4)) where !bytes.isEmpty {
                    bytes[Int(rng.next() % UInt64(bytes.count))] = UInt8(truncatingIfNeeded: rng.next())
                }
                if rng.next() % 3 == 0 { bytes.removeLast(Int(rng.next() % UInt64(bytes.count))) }
            }
            do { _ = try decodeBytes(bytes); decoded += 1 } catch { rejected += 1 }
        }
        #expect(decoded + rejected == 20_000)
        #expect(rejected > 0)
    }
}

@Suite("region table")
struct RegionTableTests {
    let table = RegionTable(pageSize: 4096, regions: [
        RegionDescriptor(size: 4096 * 10, sourceOffset: 0, name: "a"),
        RegionDescriptor(size: 4096 * 5, sourceOffset: 4096 * 10, name: "b"),
    ])

    @Test func globalNumbering() {
        #expect(table.totalPages == 15)
        #expect(table.locate(globalPage: 0) == (0, 0))
        #expect(table.locate(globalPage: 9) == (0, 9))
        #expect(table.locate(globalPage: 10) == (1, 0))
        #expect(table.locate(globalPage: 14) == (1, 4))
    }

    @Test func rangesOutsideARegionAreRejected() {
        #expect(throws: Never.self) { try table.validate(region: 1, pageOffset: 0, pageCount: 5) }
        #expect(throws: WireError.self) { try table.validate(region: 1, pageOffset: 1, pageCount: 5) }
        #expect(throws: WireError.self) { try table.validate(region: 2, pageOffset: 0, pageCount: 1) }
        #expect(throws: WireError.self) { try table.validate(region: 0, pageOffset: .max, pageCount: 2) }
        #expect(throws: WireError.self) { try table.validate(region: 0, pageOffset: 0, pageCount: 0) }
    }
}

struct SplitMix {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}
