import CPostcopy
import PostcopyDestination
import PostcopyTransport
import PostcopyWire
import Synchronization
import Testing

/// A hostile source answering the gathers of a working-set replay: the
/// destination fails with a clear error and installs nothing it did not ask
/// for, whether the pages would land in a buffer (copy) or straight in
/// shared memory (continue).
@Suite("hostile source vs gathers", .serialized, .enabled(if: uffdSkipReason == nil, "userfaultfd unavailable (reason printed above)"))
struct HostileGatherTests {
    typealias FakeSource = HostileSourceTests.FakeSource
    static let pages = 256

    /// A working set of scattered pages (every 7th, with the digest of the
    /// fake source's pages), so the replay gathers.
    static let workingSet: WorkingSet = {
        let digest = HostileSourceTests.page.withUnsafeBytes { cpc_xxh64($0.baseAddress, 4096, 0) }
        return WorkingSet(pageSize: 4096, regionPages: [UInt64(pages)], recordedMs: 1000,
                          entries: stride(from: 3, to: pages, by: 7).map { WorkingSet.Entry(page: UInt64($0), digest: digest) })
    }()

    static func gatherData(_ g: GatherRequest, shift: UInt64 = 0, dropPages: Int = 0) -> [UInt8] {
        let runs = g.runs.map { GatherRun(region: $0.region, pageOffset: $0.pageOffset + shift, pageCount: $0.pageCount) }
        let data = GatherData(firstRequestID: g.firstRequestID, pageClass: g.pageClass, sourcePaused: true, runs: runs)
        let payload = [UInt8](repeating: 0xAB, count: data.payloadBytes(pageSize: 4096))
        var frame = payload.withUnsafeBytes { Codec.encode(.gatherData(data, payload: $0)) }
        if dropPages > 0 {
            frame.removeLast(dropPages * 4096)
            let body = frame.count - WireProtocol.headerSize
            for i in 0..<4 { frame[4 + i] = UInt8(truncatingIfNeeded: body >> (8 * i)) }
        }
        return frame
    }

    func expectFailure(containing text: String, _ reply: @escaping @Sendable (GatherRequest) -> [UInt8]) throws {
        for install in InstallMode.allCases {
            let fake = try FakeSource(pages: Self.pages, gatherReply: reply) { r in HostileSourceTests.pageData(r) }
            HostileSourceTests().expectFailure(fake, containing: text, install: install, replay: Self.workingSet)
        }
    }

    @Test(.timeLimit(.minutes(1)))
    func runsThatWereNotRequested() throws {
        try expectFailure(containing: "not requested") { g in Self.gatherData(g, shift: 1) }
    }

    @Test(.timeLimit(.minutes(1)))
    func runsOutsideTheRegion() throws {
        try expectFailure(containing: "outside region") { g in Self.gatherData(g, shift: 1 << 40) }
    }

    @Test(.timeLimit(.minutes(1)))
    func payloadShorterThanItsRuns() throws {
        try expectFailure(containing: "gatherData.payload") { g in Self.gatherData(g, dropPages: 1) }
    }

    /// The honest answer: the replay's pages come in gathers (and the
    /// background stream's, where runs are scattered) and the migration completes, on both install paths (on continue, each run
    /// received straight into shared memory).
    @Test(.timeLimit(.minutes(1)))
    func honestGathersComplete() throws {
        for install in InstallMode.allCases {
            let gathered = Atomic<Int>(0)
            let fake = try FakeSource(pages: Self.pages, gatherReply: { g in
                gathered.add(g.requests.reduce(0) { $0 + Int($1.pageCount) }, ordering: .relaxed)
                return Self.gatherData(g)
            }) { r in HostileSourceTests.pageData(r) }
            defer { fake.stop() }
            let r = try runDestination(port: fake.port, touch: .none, threads: 1, install: install, replay: Self.workingSet)
            // The replay's pages, and the stream's scattered runs after it.
            #expect(gathered.load(ordering: .relaxed) >= Self.workingSet.entries.count, "\(install): \(gathered.load(ordering: .relaxed)) pages gathered")
            if install == .continue { #expect(r.pagesReceivedInPlace == UInt64(Self.pages), "\(install): \(r.pagesReceivedInPlace) in place") }
        }
    }
}

/// A hostile destination's gathers against a real source: a run out of range
/// gets an error frame and a closed connection, and not one page of the
/// gather goes out; a good gather is answered whole.
@Suite("hostile gathers vs source", .serialized, .enabled(if: uffdSkipReason == nil, "userfaultfd unavailable (reason printed above)"))
struct HostileGatherRequestTests {
    @Test(.timeLimit(.minutes(1)))
    func aGatherWithOneBadRunIsRefusedWhole() throws {
        let mem = try TempMemory(size: 1 << 20)  // 256 pages
        let server = try startServer(mem)
        defer { server.stop() }
        for bad in [GatherRun(region: 0, pageOffset: 256, pageCount: 1), GatherRun(region: 0, pageOffset: 250, pageCount: 64),
                    GatherRun(region: 3, pageOffset: 0, pageCount: 1), GatherRun(region: 0, pageOffset: .max, pageCount: 2)] {
            let c = try rawConnect(server.port)
            _ = try HostileDestinationTests.hello(c)
            try c.send(.gatherRequest(GatherRequest(firstRequestID: 1, pageClass: .background,
                                                    runs: [GatherRun(region: 0, pageOffset: 0, pageCount: 2), bad])))
            let seen = drainUntilClosed(c)
            #expect(seen.error?.code == .outOfRange, "run \(bad)")
            #expect(seen.frames.isEmpty, "no page of a refused gather may go out: \(seen.frames)")
            #expect(seen.closed)
        }
        // The source still serves, and answers a good gather with every run, in order.
        let c = try rawConnect(server.port)
        _ = try HostileDestinationTests.hello(c)
        let runs = [GatherRun(region: 0, pageOffset: 200, pageCount: 1), GatherRun(region: 0, pageOffset: 3, pageCount: 2)]
        try c.send(.gatherRequest(GatherRequest(firstRequestID: 40, pageClass: .background, runs: runs)))
        guard case .gatherData(let g, let payload) = try c.receive(timeoutMs: 10_000) else { Issue.record("no gather reply"); return }
        #expect(g.firstRequestID == 40 && g.runs.map(\.pageOffset) == [200, 3] && g.runs.map(\.pageCount) == [1, 2])
        var expected: [UInt8] = []
        for r in g.runs where !r.isZero {
            expected += Array(UnsafeRawBufferPointer(start: mem.mapping.base + Int(r.pageOffset) * 4096, count: Int(r.pageCount) * 4096))
        }
        #expect(Array(payload) == expected)
        #expect(server.stats.gathers.load(ordering: .relaxed) == 1)
    }
}
