import CPostcopy
import Foundation
import PostcopyCore
import PostcopyDestination
import PostcopySource
import PostcopyTransport
import PostcopyWire
import Testing

/// Guest RAM is secret: a source with a shared key serves nothing to a peer that
/// cannot prove it, and a destination with a key refuses a source that cannot.
@Suite("authentication", .serialized, .enabled(if: uffdSkipReason == nil, "userfaultfd unavailable (reason printed above)"))
struct AuthTests {
    static let key = Array("correct horse battery staple 42!".utf8)
    static let wrong = Array("incorrect horse battery staple!!".utf8)

    func keyedServer(_ mem: TempMemory, key: [UInt8]?) throws -> PageServer {
        let sm = try SourceMemory(file: mem.file, pageSize: 4096, deviceState: Array("secret device state".utf8))
        let s = try PageServer(memory: sm, listen: Endpoint(host: "127.0.0.1", port: 0), exitAfterCompletion: false,
                               authKey: key, logger: testLogger("test.auth"))
        s.start()
        return s
    }

    func migrate(port: Int, key: [UInt8]?) throws -> DestinationReport {
        var options = DestinationOptions()
        options.touch = .random
        options.threads = 2
        let dest = StandaloneDestination(options: options, logger: testLogger("test.auth.dest"))
        return try dest.run(transport: TCPTransport(endpoint: Endpoint(host: "127.0.0.1", port: port), maxBatchPages: 128, authKey: key),
                            transportReason: "test")
    }

    @Test(.timeLimit(.minutes(2)))
    func theRightKeyMigrates() throws {
        let mem = try TempMemory(size: 4 << 20)
        let server = try keyedServer(mem, key: Self.key)
        defer { server.stop() }
        let r = try migrate(port: server.port, key: Self.key)
        #expect(r.digestMatch && r.sourceConfirmedDigest)
    }

    /// Without the key, or with the wrong one, a peer gets an error and 0 bytes of
    /// guest memory (nor the region table or the device state).
    @Test(.timeLimit(.minutes(2)))
    func aPeerWithoutTheKeyGetsNothing() throws {
        let mem = try TempMemory(size: 4 << 20, zeroPercent: 0)
        let server = try keyedServer(mem, key: Self.key)
        defer { server.stop() }
        for (name, key) in [("no key", nil), ("wrong key", Self.wrong)] as [(String, [UInt8]?)] {
            #expect(throws: DestinationError.self, "\(name)") { _ = try migrate(port: server.port, key: key) }
        }
        // A raw peer that asks for pages anyway, with a made-up proof.
        let c = try rawConnect(server.port)
        let nonce = Authentication.nonce()
        try c.send(.hello(Hello(role: .main, capabilities: [.authentication, .encryption], sessionID: 0,
                                extensions: [HandshakeExtension(type: ExtensionType.clientNonce, value: nonce)])))
        guard case .authChallenge = try c.receive(timeoutMs: 10_000) else { Issue.record("no challenge"); return }
        try c.send(.authResponse(AuthResponse(proof: [UInt8](repeating: 0, count: 32))))
        try c.send(.pageRequest(PageRequest(requestID: 1, region: 0, pageClass: .demand, pageOffset: 0, pageCount: 64)))
        let seen = drainUntilClosed(c)
        #expect(seen.error?.code == .authenticationFailed)
        #expect(seen.frames.isEmpty, "nothing but the error")
        #expect(c.bytesReceived < 200, "the refused peer received \(c.bytesReceived) bytes")
        #expect(server.stats.demandPages.load(ordering: .relaxed) == 0)
        #expect(server.stats.backgroundPages.load(ordering: .relaxed) == 0)
        #expect(server.stats.bytesSent.load(ordering: .relaxed) < 1000, "no page left the source")
    }

    @Test(.timeLimit(.minutes(2)))
    func aDestinationWithAKeyRefusesAnUnauthenticatedSource() throws {
        let mem = try TempMemory(size: 1 << 20)
        let server = try keyedServer(mem, key: nil)
        defer { server.stop() }
        do {
            _ = try migrate(port: server.port, key: Self.key)
            Issue.record("took pages from an unauthenticated source")
        } catch {
            #expect("\(error)".contains("did not authenticate"), "\(error)")
        }
    }

    @Test func proofsDependOnKeyAndBothNonces() {
        let a = Authentication.nonce(), b = Authentication.nonce()
        let p = Authentication.sourceProof(key: Self.key, clientNonce: a, serverNonce: b)
        #expect(p.count == 32)
        #expect(Authentication.equal(p, Authentication.sourceProof(key: Self.key, clientNonce: a, serverNonce: b)))
        #expect(!Authentication.equal(p, Authentication.sourceProof(key: Self.wrong, clientNonce: a, serverNonce: b)))
        #expect(!Authentication.equal(p, Authentication.sourceProof(key: Self.key, clientNonce: b, serverNonce: a)))
        #expect(!Authentication.equal(p, Authentication.destinationProof(key: Self.key, clientNonce: a, serverNonce: b)), "a source proof never passes as a destination proof")
    }
}
