import CPostcopy
import Foundation
import PostcopyCore
import PostcopyDestination
import PostcopySource
import PostcopyTesting
import PostcopyTransport
import PostcopyWire
import Testing

/// Migrations over the encrypted TCP stream, real source, real destination,
/// real userfaultfd: byte-exact on both install paths; a record tampered with,
/// replayed, reordered or cut on the path fails that connection, the
/// destination reconnects with fresh keys, and every byte still arrives; a
/// wrong key or a peer in the other mode is refused with the reason.
@Suite("encrypted migrations", .serialized, .enabled(if: uffdSkipReason == nil, "userfaultfd unavailable (reason printed above)"))
struct EncryptionTests {
    static let key = Array("correct horse battery staple 42!".utf8)

    func server(_ mem: TempMemory, encryption: StreamEncryption = .on) throws -> PageServer {
        let sm = try SourceMemory(file: mem.file, pageSize: 4096, deviceState: Array("device state".utf8))
        let s = try PageServer(memory: sm, listen: Endpoint(host: "127.0.0.1", port: 0), exitAfterCompletion: false,
                               authKey: Self.key, encryption: encryption, logger: testLogger("test.enc.source"))
        s.start()
        return s
    }

    func migrate(port: Int, install: InstallMode = .copy, encryption: StreamEncryption = .on, key: [UInt8] = EncryptionTests.key,
                 compare: ByteComparison? = nil, slow: Bool = false) throws -> DestinationReport {
        var options = DestinationOptions()
        options.install = install
        options.touch = .random
        options.threads = 2
        if slow {
            // Long enough for the proxy to reach its record while pages still flow.
            options.thinkMicroseconds = 100
            options.engine.backgroundRate = 16 << 20
        }
        options.engine.recoveryDeadline = 10
        if let compare { options.inspect = { compare.check($0) } }
        let dest = StandaloneDestination(options: options, logger: testLogger("test.enc.dest"))
        return try dest.run(transport: TCPTransport(endpoint: Endpoint(host: "127.0.0.1", port: port), maxBatchPages: 128,
                                                    authKey: key, encryption: encryption), transportReason: "test")
    }

    @Test(.timeLimit(.minutes(2)), arguments: InstallMode.allCases)
    func anEncryptedMigrationIsByteExact(install: InstallMode) throws {
        if skipped(install) { return }
        let mem = try TempMemory(size: 32 << 20, zeroPercent: 10, seed: 61)
        let s = try server(mem)
        defer { s.stop() }
        let cmp = ByteComparison(expected: mem.mapping.bytes)
        let r = try migrate(port: s.port, install: install, compare: cmp)
        #expect(cmp.firstDifference == nil)
        #expect(r.digestMatch && r.sourceConfirmedDigest)
        #expect(r.encrypted)
        let pages = UInt64(r.nonZeroPages * 4096)
        #expect(r.bytesDecrypted >= pages, "decrypted \(r.bytesDecrypted) bytes for \(pages) bytes of pages")
        if install == .continue { #expect(r.pagesReceivedInPlace > 0, "pages decrypted straight into the alias") }
    }

    /// One record from the source mistreated on the path, at a page payload:
    /// the connection fails (`integrity` or cut), the destination reconnects
    /// with fresh keys and completes, every byte equal.
    @Test(.timeLimit(.minutes(3)), arguments: RecordFault.Kind.allCases, InstallMode.allCases)
    func anAttackedRecordCostsAReconnectNotAByte(_ kind: RecordFault.Kind, install: InstallMode) throws {
        if skipped(install) { return }
        let mem = try TempMemory(size: 24 << 20, zeroPercent: 10, seed: 62)
        let s = try server(mem)
        defer { s.stop() }
        let proxy = try ChaosProxy(target: Endpoint(host: "127.0.0.1", port: s.port), recordFault: RecordFault(kind, afterRecords: 200))
        defer { proxy.stop() }
        let cmp = ByteComparison(expected: mem.mapping.bytes)
        let r = try migrate(port: proxy.port, install: install, compare: cmp, slow: true)
        #expect(proxy.affected == 1, "the proxy must really have mistreated a record")
        #expect(r.recoveryNs.count >= 1, "the damaged connection must have been dropped and rejoined")
        #expect(cmp.firstDifference == nil, "first differing byte at \(String(describing: cmp.firstDifference))")
        #expect(r.digestMatch && r.sourceConfirmedDigest)
        print("record \(kind) (\(install)): \(r.recoveryNs.count) reconnect(s), every byte equal")
    }

    /// Both sides must run the same mode: each refuses the other, with a reason
    /// that says what to change, and no page moves.
    @Test(.timeLimit(.minutes(2)))
    func aPeerInTheOtherModeIsRefused() throws {
        let mem = try TempMemory(size: 4 << 20, zeroPercent: 0)
        for (source, dest) in [(StreamEncryption.on, StreamEncryption.off), (.off, .on)] {
            let s = try server(mem, encryption: source)
            defer { s.stop() }
            do {
                _ = try migrate(port: s.port, encryption: dest)
                Issue.record("source \(source), destination \(dest): migrated")
            } catch {
                #expect("\(error)".contains("--encryption"), "\(error)")
            }
            #expect(s.stats.demandPages.load(ordering: .relaxed) + s.stats.backgroundPages.load(ordering: .relaxed) == 0)
        }
        // Off on both sides: authenticated, in clear.
        let s = try server(mem, encryption: .off)
        defer { s.stop() }
        let r = try migrate(port: s.port, encryption: .off)
        #expect(r.digestMatch && !r.encrypted && r.bytesDecrypted == 0)
    }

    /// A wrong key never gets as far as a record: the proofs fail first.
    @Test(.timeLimit(.minutes(2)))
    func aWrongKeyIsRefused() throws {
        let mem = try TempMemory(size: 4 << 20, zeroPercent: 0)
        let s = try server(mem)
        defer { s.stop() }
        #expect(throws: DestinationError.self) { _ = try migrate(port: s.port, key: Array("incorrect horse battery staple!!".utf8)) }
        #expect(s.stats.bytesEncrypted.load(ordering: .relaxed) == 0)
    }
}
