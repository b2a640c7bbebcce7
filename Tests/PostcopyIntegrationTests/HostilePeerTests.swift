import CPostcopy
import Foundation
import PostcopyCore
import PostcopyDestination
import PostcopySource
import PostcopyTransport
import PostcopyWire
import Testing

/// A hostile destination talking to a real source: every bad input gets an error
/// frame and a closed connection, and the source keeps serving honest peers.
@Suite("hostile destination vs source", .serialized, .enabled(if: uffdSkipReason == nil, "userfaultfd unavailable (reason printed above)"))
struct HostileDestinationTests {
    static func hello(_ c: TCPConnection) throws -> Welcome {
        try c.send(.hello(Hello(role: .main, capabilities: [.zeroMap], sessionID: 0)))
        guard case .welcome(let w) = try c.receive(timeoutMs: 10_000) else { throw TransportError.protocolViolation("no welcome") }
        c.pageSize = Int(w.pageSize)
        return w
    }

    @Test(.timeLimit(.minutes(2)))
    func badInputClosesOnlyThatConnection() throws {
        let mem = try TempMemory(size: 1 << 20)
        let server = try startServer(mem)
        defer { server.stop() }

        // 1. Garbage instead of a frame.
        var c = try rawConnect(server.port)
        let garbage: [UInt8] = Array("GET / HTTP/1.1\r\nHost: x\r\n\r\n".utf8)
        try garbage.withUnsafeBytes { try c.send($0, UnsafeRawBufferPointer(start: nil, count: 0)) }
        var seen = drainUntilClosed(c)
        #expect(seen.error?.code == .protocolViolation)
        #expect(seen.error?.message.contains("magic") == true)
        #expect(seen.closed)

        // 2. A frame header announcing a 2 GiB body.
        c = try rawConnect(server.port)
        let huge: [UInt8] = [0x50, 0x43, MessageType.hello.rawValue, 0, 0xFF, 0xFF, 0xFF, 0x7F]
        try huge.withUnsafeBytes { try c.send($0, UnsafeRawBufferPointer(start: nil, count: 0)) }
        seen = drainUntilClosed(c)
        #expect(seen.error?.message.contains("exceeds") == true)
        #expect(seen.closed)

        // 3. A page request before the handshake.
        c = try rawConnect(server.port)
        try c.send(.pageRequest(PageRequest(requestID: 1, region: 0, pageClass: .demand, pageOffset: 0, pageCount: 1)))
        seen = drainUntilClosed(c)
        #expect(seen.error?.code == .protocolViolation)
        #expect(seen.frames.isEmpty, "no page may be sent before the handshake")

        // 4. Pages outside the region, a region that does not exist, an offset that overflows.
        for bad in [PageRequest(requestID: 2, region: 0, pageClass: .demand, pageOffset: 256, pageCount: 1),
                    PageRequest(requestID: 3, region: 0, pageClass: .background, pageOffset: 250, pageCount: 64),
                    PageRequest(requestID: 4, region: 7, pageClass: .demand, pageOffset: 0, pageCount: 1),
                    PageRequest(requestID: 5, region: 0, pageClass: .demand, pageOffset: .max, pageCount: 2)] {
            c = try rawConnect(server.port)
            _ = try Self.hello(c)
            try c.send(.pageRequest(bad))
            seen = drainUntilClosed(c)
            #expect(seen.error?.code == .outOfRange, "request \(bad)")
            #expect(seen.frames.isEmpty)
            #expect(seen.closed)
        }

        // 5. An urgent channel for a session that does not exist.
        c = try rawConnect(server.port)
        try c.send(.hello(Hello(role: .urgent, capabilities: [], sessionID: 12345)))
        seen = drainUntilClosed(c)
        #expect(seen.error?.code == .unknownSession)

        // 6. A frame cut off mid-body, then the peer vanishes.
        c = try rawConnect(server.port)
        let frame = Codec.encode(.hello(Hello(role: .main, capabilities: [], sessionID: 0)))
        try frame.withUnsafeBytes { try c.send(UnsafeRawBufferPointer(rebasing: $0[0..<12]), UnsafeRawBufferPointer(start: nil, count: 0)) }
        c.close()

        // The server is still fine: an honest destination migrates everything.
        let r = try runDestination(port: server.port, touch: .random, threads: 2)
        #expect(r.digestMatch)
        #expect(server.stats.rejectedConnections.load(ordering: .relaxed) >= 8)
    }
}

extension HostileDestinationTests {
    /// The source takes a burst of requests in one read and answers it in one
    /// vectored send: the replies still come in request order with the right
    /// bytes, and a bad request in the middle gets the replies before it, then
    /// its error, and nothing after it.
    @Test(.timeLimit(.minutes(2)))
    func aBurstIsAnsweredInOrderUpToTheFirstBadRequest() throws {
        let mem = try TempMemory(size: 1 << 20)  // 256 pages
        let server = try startServer(mem)
        defer { server.stop() }
        let c = try rawConnect(server.port)
        _ = try Self.hello(c)
        var requests: [PageRequest] = []
        for i in 0..<200 {
            let cls: PageClass = i % 3 == 0 ? .background : .demand
            let offset = UInt64((i * 37) % 255)
            requests.append(PageRequest(requestID: UInt64(100 + i), region: 0, pageClass: cls, pageOffset: offset,
                                        pageCount: UInt32(1 + i % 2)))
        }
        requests.append(PageRequest(requestID: 999, region: 0, pageClass: .demand, pageOffset: 256, pageCount: 1))
        requests += (0..<3).map { PageRequest(requestID: UInt64(1000 + $0), region: 0, pageClass: .demand, pageOffset: 0, pageCount: 1) }
        var burst: [UInt8] = []
        for r in requests { burst += Codec.encode(.pageRequest(r)) }
        try burst.withUnsafeBytes { try c.send($0, UnsafeRawBufferPointer(start: nil, count: 0)) }

        let source = UnsafeRawBufferPointer(start: mem.mapping.base, count: mem.mapping.length)
        var answered = 0
        var refusal: ErrorMessage?
        while refusal == nil {
            do {
                guard case .pageData(let h, let payload) = try c.receive(timeoutMs: 10_000) else {
                    Issue.record("expected page data")
                    break
                }
                let r = requests[answered]
                let sameRequest = h.requestID == r.requestID && h.pageOffset == r.pageOffset
                    && h.pageCount == r.pageCount && h.pageClass == r.pageClass
                #expect(sameRequest, "reply \(answered) answers request \(r.requestID)")
                let from = Int(r.pageOffset) * 4096
                let expected = UnsafeRawBufferPointer(rebasing: source[from..<(from + Int(r.pageCount) * 4096)])
                let equal: Bool
                if h.isZero {
                    equal = payload.isEmpty && expected.allSatisfy { $0 == 0 }
                } else {
                    equal = payload.count == expected.count && memcmp(payload.baseAddress!, expected.baseAddress!, expected.count) == 0
                }
                #expect(equal, "bytes of request \(r.requestID)")
                answered += 1
            } catch {
                guard case .peer(let e) = error else { Issue.record("\(error)"); break }
                refusal = e
            }
        }
        #expect(answered == 200)
        #expect(refusal?.code == .outOfRange)
        #expect((try? c.receive(timeoutMs: 10_000)) == nil, "nothing after the refusal; the connection closes")
        let r = try runDestination(port: server.port, touch: .random, threads: 2)
        #expect(r.digestMatch)
    }
}

/// A hostile source talking to a real destination: the destination fails with a
/// clear error and never installs pages it did not ask for.
@Suite("hostile source vs destination", .serialized, .enabled(if: uffdSkipReason == nil, "userfaultfd unavailable (reason printed above)"))
struct HostileSourceTests {
    /// A fake source: handshake and control are honest; `pageReply` decides
    /// what goes back for each page request.
    final class FakeSource: @unchecked Sendable {
        let listener: TCPListener
        let welcome: Welcome
        let pageReply: @Sendable (PageRequest) -> [UInt8]
        let firstReply: [UInt8]?
        /// What goes back for a gather (offered only when set).
        let gatherReply: (@Sendable (GatherRequest) -> [UInt8])?
        var threads: [PThread] = []

        init(pages: Int, firstReply: [UInt8]? = nil, gatherReply: (@Sendable (GatherRequest) -> [UInt8])? = nil,
             pageReply: @escaping @Sendable (PageRequest) -> [UInt8]) throws {
            listener = try TCPListener(Endpoint(host: "127.0.0.1", port: 0))
            self.gatherReply = gatherReply
            welcome = Welcome(pageSize: 4096, sessionID: 77, capabilities: gatherReply == nil ? [.zeroMap, .urgentChannel] : [.zeroMap, .urgentChannel, .gather],
                              regions: [RegionDescriptor(size: UInt64(pages * 4096), sourceOffset: 0, name: "ram")],
                              digest: 0, deviceStateSize: 0)
            self.pageReply = pageReply
            self.firstReply = firstReply
            threads.append(PThread(name: "fake-accept") { [self] in
                while let c = try? listener.accept(maxBody: 1 << 16) {
                    threads.append(PThread(name: "fake-conn") { [self] in serve(c) })
                }
            })
        }

        func serve(_ c: TCPConnection) {
            do {
                guard case .hello = try c.receive(timeoutMs: 10_000) else { return }
                if let firstReply {
                    try firstReply.withUnsafeBytes { try c.send($0, UnsafeRawBufferPointer(start: nil, count: 0)) }
                    _ = try? c.receive(timeoutMs: 10_000)
                    return
                }
                try c.send(.welcome(welcome))
                c.pageSize = 4096
                while true {
                    switch try c.receive(timeoutMs: 20_000) {
                    case .zeroMapRequest(let z):
                        try c.send(.zeroMap(ZeroMap(region: z.region, firstPage: z.firstPage, pageCount: z.pageCount,
                                                    bits: [UInt8](repeating: 0, count: Int((z.pageCount + 7) / 8)))))
                    case .pageRequest(let r):
                        let bytes = pageReply(r)
                        try bytes.withUnsafeBytes { try c.send($0, UnsafeRawBufferPointer(start: nil, count: 0)) }
                    case .gatherRequest(let g) where gatherReply != nil:
                        let bytes = gatherReply!(g)
                        try bytes.withUnsafeBytes { try c.send($0, UnsafeRawBufferPointer(start: nil, count: 0)) }
                    case .complete:
                        try c.send(.completeAck(CompleteAck(digestMatches: false, pagesSentTwice: 0)))
                    case .deviceStateRequest:
                        try c.send(.deviceState(DeviceState(totalSize: 0, offset: 0, data: [])))
                    default:
                        return
                    }
                }
            } catch {}
        }

        var port: Int { listener.port }
        func stop() {
            listener.shutdown()
            listener.fd.close()
        }
    }

    static let page = [UInt8](repeating: 0xAB, count: 4096)

    static func pageData(_ r: PageRequest, region: UInt16? = nil, offset: UInt64? = nil, count: UInt32? = nil) -> [UInt8] {
        let n = Int(count ?? r.pageCount)
        let payload = [UInt8](repeating: 0xAB, count: n * 4096)
        return payload.withUnsafeBytes {
            Codec.encode(.pageData(PageDataHeader(requestID: r.requestID, region: region ?? r.region, pageClass: r.pageClass,
                                                  isZero: false, pageOffset: offset ?? r.pageOffset, pageCount: UInt32(n)), payload: $0))
        }
    }

    func expectFailure(_ fake: FakeSource, containing text: String, install: InstallMode = .copy, replay: WorkingSet? = nil) {
        defer { fake.stop() }
        do {
            _ = try runDestination(port: fake.port, touch: .none, threads: 1, install: install, replay: replay)
            Issue.record("destination accepted a hostile source")
        } catch {
            #expect("\(error)".contains(text), "error was: \(error)")
        }
    }

    /// Well-formed pages whose digest does not match what the source announced:
    /// the run completes but reports the mismatch (the CLI exits 3 on it).
    @Test(.timeLimit(.minutes(1)))
    func digestMismatchIsReported() throws {
        let fake = try FakeSource(pages: 64) { r in Self.pageData(r) }
        defer { fake.stop() }
        let r = try runDestination(port: fake.port, touch: .random, threads: 2)
        #expect(r.digestMatch == false)
        #expect(r.sourceConfirmedDigest == false)
        #expect(r.sourceDigest != r.destinationDigest)
    }

    @Test(.timeLimit(.minutes(1)))
    func garbageHandshake() throws {
        expectFailure(try FakeSource(pages: 16, firstReply: Array("SSH-2.0-OpenSSH_9.2\r\n".utf8)) { _ in [] }, containing: "magic")
    }

    @Test(.timeLimit(.minutes(1)))
    func pagesOutsideTheRegion() throws {
        expectFailure(try FakeSource(pages: 16) { r in Self.pageData(r, offset: 1 << 40, count: 1) }, containing: "outside region")
    }

    @Test(.timeLimit(.minutes(1)))
    func regionThatDoesNotExist() throws {
        expectFailure(try FakeSource(pages: 16) { r in Self.pageData(r, region: 9) }, containing: "does not exist")
    }

    @Test(.timeLimit(.minutes(1)))
    func pagesThatWereNotRequested() throws {
        // In range, but not what was asked for: shifting by one page would overwrite
        // a page the guest may already own.
        expectFailure(try FakeSource(pages: 256) { r in Self.pageData(r, offset: r.pageOffset + 1, count: 1) }, containing: "not requested")
    }

    @Test(.timeLimit(.minutes(1)))
    func payloadShorterThanAnnounced() throws {
        expectFailure(try FakeSource(pages: 16) { r in
            var f = Self.pageData(r)
            f.removeLast(4096)
            f[4] = UInt8(truncatingIfNeeded: (f.count - 8))
            f[5] = UInt8(truncatingIfNeeded: (f.count - 8) >> 8)
            f[6] = UInt8(truncatingIfNeeded: (f.count - 8) >> 16)
            return f
        }, containing: "pageData.payload")
    }

    @Test(.timeLimit(.minutes(1)))
    func frameLargerThanAnyBatch() throws {
        expectFailure(try FakeSource(pages: 16) { _ in [0x50, 0x43, MessageType.pageData.rawValue, 0, 0, 0, 0, 0x40] }, containing: "exceeds")
    }
}
