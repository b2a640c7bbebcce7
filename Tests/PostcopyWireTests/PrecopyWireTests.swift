import Testing
@testable import PostcopyWire

private func decode(_ bytes: [UInt8]) throws(WireError) -> Message {
    let r: Result<Message, WireError> = bytes.withUnsafeBytes { raw in
        Result { () throws(WireError) in try Codec.decodeFrame(raw, pageSize: 4096).0 }
    }
    return try r.get()
}

private func dirtySet(_ bytes: [UInt8]) throws -> DirtySet {
    guard case .dirtySet(let d) = try decode(bytes) else { Issue.record("not a dirty set"); return DirtySet(pass: 0, isFinal: false, isLastChunk: false, firstPage: 0, pageCount: 0, runs: []) }
    return d
}

@Suite struct PrecopyWireTests {
    @Test func dirtySetsRoundTripAsRunsAndAsBitmaps() throws {
        // Few runs: encoded as runs; many short ones: as a bitmap (smaller). Both decode to the same runs.
        let sparse = DirtySet(pass: 3, isFinal: true, isLastChunk: true, firstPage: 1000, pageCount: 1 << 20,
                              runs: [1000..<1003, 5000..<9000], decision: "converged after 3 passes")
        let dense = DirtySet(pass: 2, isFinal: false, isLastChunk: false, firstPage: 0, pageCount: 4099,
                             runs: stride(from: 0, to: 4099, by: 3).map { UInt64($0)..<UInt64($0 + 1) })
        for d in [sparse, dense] {
            let bytes = Codec.encode(.dirtySet(d))
            #expect(try dirtySet(bytes) == d)
            #expect(d.dirtyPages == d.runs.reduce(0) { $0 + UInt64($1.count) })
        }
        #expect(Codec.encode(.dirtySet(dense)).count < 4 + dense.runs.count * 8)  // the bitmap was chosen
        #expect(Codec.encode(.dirtySet(sparse)).count < 1 << 17)                  // the runs were chosen
        guard case .precopyPassRequest(let p) = try decode(Codec.encode(.precopyPassRequest(PrecopyPassRequest(pass: 7)))) else {
            Issue.record("not a pass request"); return
        }
        #expect(p.pass == 7)
    }

    @Test func pausedFlagOfPageDataRoundTrips() throws {
        let h = PageDataHeader(requestID: 9, region: 0, pageClass: .precopy, isZero: true, sourcePaused: true, pageOffset: 4, pageCount: 2)
        let bytes = Codec.encode(.pageData(h, payload: UnsafeRawBufferPointer(start: nil, count: 0)))
        guard case .pageData(let back, _) = try decode(bytes) else { Issue.record("not page data"); return }
        #expect(back == h)
        var bad = bytes
        bad[8 + 11] |= 4  // an unknown flag bit
        #expect(throws: WireError.self) { _ = try decode(bad) }
    }

    /// Malformed sets are refused by the decoder, whatever the sender meant.
    @Test func malformedDirtySetsAreRefused() throws {
        // 1000 pages, two runs: encoded as runs (20 bytes against a 125-byte bitmap).
        let good = Codec.encode(.dirtySet(DirtySet(pass: 1, isFinal: false, isLastChunk: true, firstPage: 0, pageCount: 1000,
                                                   runs: [2..<4, 10..<12])))
        // Layout after the 8-byte frame header: pass u32, flags u8, first u64, count u64, decision (u16 + bytes), runCount u32, runs.
        let runs = 8 + 4 + 1 + 8 + 8 + 2
        func patched(_ at: Int, _ bytes: [UInt8]) -> [UInt8] {
            var b = good
            for (i, x) in bytes.enumerated() { b[at + i] = x }
            return b
        }
        #expect(throws: WireError.self) { _ = try decode(patched(8 + 4, [0x80])) }                  // unknown flag
        #expect(throws: WireError.self) { _ = try decode(patched(8 + 5 + 8, [0, 0, 0, 0, 0, 0, 0, 0])) }  // empty chunk
        #expect(throws: WireError.self) { _ = try decode(patched(runs + 4 + 8, [1, 0, 0, 0])) }      // second run before the first's end
        #expect(throws: WireError.self) { _ = try decode(patched(runs + 4 + 8, [4, 0, 0, 0])) }      // touching the first (not merged)
        #expect(try dirtySet(good).runs == [2..<4, 10..<12])
        #expect(throws: WireError.self) { _ = try decode(patched(runs + 4 + 8, [0xE7, 0x03, 0, 0])) } // past the chunk's end (999 + 2)
        #expect(throws: WireError.self) { _ = try decode(patched(runs + 4 + 4, [0, 0, 0, 0])) }      // an empty run
        #expect(throws: WireError.self) { _ = try decode(patched(runs, [3, 0, 0, 0])) }              // more runs than bytes
        #expect(throws: WireError.self) { _ = try decode(Codec.encode(.precopyPassRequest(PrecopyPassRequest(pass: 0)))) }
        // A bitmap with bits past the last page.
        var bitmap = Codec.encode(.dirtySet(DirtySet(pass: 1, isFinal: false, isLastChunk: true, firstPage: 0, pageCount: 13,
                                                     runs: (0..<6).map { UInt64(2 * $0)..<UInt64(2 * $0 + 1) })))
        #expect(try dirtySet(bitmap).runs.count == 6)
        bitmap[bitmap.count - 1] |= 0x80
        #expect(throws: WireError.self) { _ = try decode(bitmap) }
    }
}
