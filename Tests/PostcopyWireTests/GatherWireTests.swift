import Testing
@testable import PostcopyWire

private func decode(_ bytes: [UInt8], pageSize: Int? = 4096) throws(WireError) -> Message {
    let r: Result<Message, WireError> = bytes.withUnsafeBytes { raw in
        Result { () throws(WireError) in try Codec.decodeFrame(raw, pageSize: pageSize).0 }
    }
    return try r.get()
}

private let runs = [GatherRun(region: 0, pageOffset: 9, pageCount: 1), GatherRun(region: 1, pageOffset: 2, pageCount: 3),
                    GatherRun(region: 0, pageOffset: 4, pageCount: 2)]

@Suite("gather messages")
struct GatherWireTests {
    @Test func requestRoundTripsAndStandsForOneRequestPerRun() throws {
        let g = GatherRequest(firstRequestID: 100, pageClass: .background, runs: runs)
        guard case .gatherRequest(let back) = try decode(Codec.encode(.gatherRequest(g))) else { Issue.record("not a gather request"); return }
        #expect(back == g)
        #expect(back.requests.map(\.requestID) == [100, 101, 102])
        #expect(back.requests[1] == PageRequest(requestID: 101, region: 1, pageClass: .background, pageOffset: 2, pageCount: 3))
        // And back: consecutive ids of one class make a gather; anything else does not.
        #expect(GatherRequest(back.requests) == g)
        var gap = back.requests
        gap[2].requestID = 200
        #expect(GatherRequest(gap) == nil)
        var mixed = back.requests
        mixed[1].pageClass = .demand
        #expect(GatherRequest(mixed) == nil)
    }

    @Test func replyCarriesOnlyTheNonZeroRunsPagesInOrder() throws {
        var zeroed = runs
        zeroed[1].isZero = true
        let g = GatherData(firstRequestID: 7, pageClass: .background, sourcePaused: true, runs: zeroed)
        #expect(g.payloadBytes(pageSize: 4096) == 3 * 4096)
        let pages: [UInt8] = (0..<(3 * 4096)).map { UInt8(truncatingIfNeeded: $0 / 4096 + 1) }
        let frame = pages.withUnsafeBytes { Codec.encode(.gatherData(g, payload: $0)) }
        // The prefix a server sends before the pages is the frame's start.
        #expect(Array(frame.prefix(frame.count - pages.count)) == Codec.encodeGatherDataPrefix(g, payloadLength: pages.count))
        let head = frame.withUnsafeBytes { UnsafeRawBufferPointer(rebasing: $0[WireProtocol.headerSize...]) }
        #expect(Codec.gatherDataHeadSize(head) == GatherData.fixedSize + 3 * GatherRun.encodedSize)
        guard case .gatherData(let back, let payload) = try decode(frame) else { Issue.record("not gather data"); return }
        #expect(back == g)
        #expect(Array(payload) == pages)
        #expect(back.header(1) == PageDataHeader(requestID: 8, region: 1, pageClass: .background, isZero: true, sourcePaused: true,
                                                 pageOffset: 2, pageCount: 3))
    }

    @Test func malformedGathersAreRefused() {
        let g = GatherData(firstRequestID: 7, pageClass: .demand, sourcePaused: false, runs: runs)
        let pages = [UInt8](repeating: 1, count: 6 * 4096)
        let good = pages.withUnsafeBytes { Codec.encode(.gatherData(g, payload: $0)) }
        // A payload one page short (the frame length patched to match), and no page size yet.
        var short = Array(good.dropLast(4096))
        short[4] = UInt8(truncatingIfNeeded: (short.count - 8)); short[5] = UInt8(truncatingIfNeeded: (short.count - 8) >> 8)
        short[6] = UInt8(truncatingIfNeeded: (short.count - 8) >> 16)
        #expect(throws: WireError.self) { try decode(short) }
        #expect(throws: WireError.self) { try decode(good, pageSize: nil) }
        // No runs, too many runs, too many pages, a zero-page run, unknown flags.
        func request(_ runs: [GatherRun], _ cls: PageClass = .background) -> [UInt8] {
            Codec.encode(.gatherRequest(GatherRequest(firstRequestID: 1, pageClass: cls, runs: runs)))
        }
        #expect(throws: WireError.self) { try decode(request([])) }
        #expect(throws: WireError.self) { try decode(request((0..<(WireProtocol.maxGatherRuns + 1)).map { GatherRun(region: 0, pageOffset: UInt64($0), pageCount: 1) })) }
        #expect(throws: WireError.self) { try decode(request([GatherRun(region: 0, pageOffset: 0, pageCount: 4000), GatherRun(region: 0, pageOffset: 5000, pageCount: 97)])) }
        #expect(throws: WireError.self) { try decode(request([GatherRun(region: 0, pageOffset: 0, pageCount: 0)])) }
        // A precopy gather decodes (the source refuses it outside a pass: `HostilePrecopySourceTests`).
        #expect((try? decode(request(runs, .precopy))) != nil)
        var flagged = request(runs)
        flagged[WireProtocol.headerSize + 8 + 1 + 2 + 2] = 1  // the first run's flags: "zero" means nothing in a request
        #expect(throws: WireError.self) { try decode(flagged) }
        // Exactly at the limits is fine.
        #expect((try? decode(request((0..<WireProtocol.maxGatherRuns).map { GatherRun(region: 0, pageOffset: UInt64($0 * 4), pageCount: 4) }))) != nil)
    }
}
