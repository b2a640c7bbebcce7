import CPostcopy
import Foundation
import PostcopyCore
import PostcopyHandoff
import PostcopySource
import PostcopyTransport
import PostcopyWire
import Synchronization
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// A source that offers precopy and answers the daemon's passes with what a
/// test scripts: each bad answer must fail that session with a clear error,
/// nothing mapped into the guest.
@Suite("hostile precopy source vs destination", .serialized, .enabled(if: uffdSkipReason == nil, "userfaultfd unavailable (reason printed above)"))
struct HostilePrecopySourceTests {
    final class FakePrecopySource: @unchecked Sendable {
        let listener: TCPListener
        let pages: Int
        /// Frames answering precopy pass n; frames answering a page request.
        let passReply: @Sendable (UInt32) -> [[UInt8]]
        let pageReply: @Sendable (PageRequest) -> [UInt8]
        let badSent = Atomic<Bool>(false)
        var threads: [PThread] = []

        init(pages: Int, passReply: @escaping @Sendable (UInt32) -> [[UInt8]],
             pageReply: @escaping @Sendable (PageRequest) -> [UInt8] = { HostileSourceTests.pageData($0) }) throws {
            listener = try TCPListener(Endpoint(host: "127.0.0.1", port: 0))
            self.pages = pages
            self.passReply = passReply
            self.pageReply = pageReply
            threads.append(PThread(name: "fake-accept") { [self] in
                while let c = try? listener.accept(maxBody: 1 << 20) {
                    threads.append(PThread(name: "fake-conn") { [self] in serve(c) })
                }
            })
        }

        func send(_ c: TCPConnection, _ bytes: [UInt8]) throws {
            try bytes.withUnsafeBytes { try c.send($0, UnsafeRawBufferPointer(start: nil, count: 0)) }
        }

        func serve(_ c: TCPConnection) {
            do {
                guard case .hello = try c.receive(timeoutMs: 10_000) else { return }
                try c.send(.welcome(Welcome(pageSize: 4096, sessionID: 77, capabilities: [.zeroMap, .urgentChannel, .precopy],
                                            regions: [RegionDescriptor(size: UInt64(pages * 4096), sourceOffset: 0, name: "ram")],
                                            digest: 0, deviceStateSize: 0)))
                c.pageSize = 4096
                while true {
                    switch try c.receive(timeoutMs: 20_000) {
                    case .precopyPassRequest(let p):
                        for f in passReply(p.pass) { try send(c, f) }
                    case .zeroMapRequest(let z):
                        try c.send(.zeroMap(ZeroMap(region: z.region, firstPage: z.firstPage, pageCount: z.pageCount,
                                                    bits: [UInt8](repeating: 0, count: Int((z.pageCount + 7) / 8)))))
                    case .pageRequest(let r):
                        try send(c, pageReply(r))
                    case .deviceStateRequest:
                        try c.send(.deviceState(DeviceState(totalSize: 0, offset: 0, data: [])))
                    default:
                        return
                    }
                }
            } catch {}
        }

        func stop() {
            listener.shutdown()
            listener.fd.close()
        }
    }

    static func set(pass: UInt32, final: Bool, first: UInt64 = 0, count: UInt64, runs: [Range<UInt64>] = []) -> [UInt8] {
        Codec.encode(.dirtySet(DirtySet(pass: pass, isFinal: final, isLastChunk: true, firstPage: first, pageCount: count, runs: runs)))
    }

    /// Runs a VMM (shared memory) against `fake` until its session failed;
    /// returns the session's report.
    func failedSession(_ fake: FakePrecopySource) throws -> HandoffSessionReport? {
        defer { fake.stop() }
        let daemon = try startHandoff(port: fake.listener.port)
        defer { daemon.stop() }
        let vmm = try TestVMM(size: fake.pages * 4096, shared: true)
        try vmm.handOver(daemon.path)
        #expect(waitFor("the bad frame") { fake.badSent.load(ordering: .relaxed) })
        usleep(500_000)  // the daemon reads it and fails the session
        vmm.goAway()
        #expect(waitFor("session end") { daemon.stats.ended.load(ordering: .relaxed) == 1 })
        return daemon.stats.reports.withLock { $0.first }
    }

    func expectFailure(_ r: HandoffSessionReport?, containing text: String) {
        #expect(r?.completed == false)
        #expect(r?.error?.contains(text) == true, "error: \(r?.error ?? "none")")
        #expect(r?.pagesContinued == 0 && r?.pagesCopied == 0, "pages were mapped from a hostile precopy source")
    }

    @Test(.timeLimit(.minutes(1)))
    func aMalformedFinalSetFailsTheSession() throws {
        let fake = try FakePrecopySource(pages: 64) { pass in
            var f = Self.set(pass: pass, final: true, count: 64)
            f[8 + 4] = 0x81  // final + an unknown flag
            return [f]
        }
        fake.badSent.store(true, ordering: .relaxed)
        expectFailure(try failedSession(fake), containing: "dirtySet.flags")
    }

    @Test(.timeLimit(.minutes(1)))
    func aFinalSetOutOfRangeFailsTheSession() throws {
        let fake = try FakePrecopySource(pages: 64) { pass in [Self.set(pass: pass, final: true, count: 80, runs: [70..<72])] }
        fake.badSent.store(true, ordering: .relaxed)
        expectFailure(try failedSession(fake), containing: "does not continue")
    }

    @Test(.timeLimit(.minutes(1)))
    func aFinalSetThatArrivesTwiceFailsTheSession() throws {
        let fake = try FakePrecopySource(pages: 64) { pass in
            [Self.set(pass: pass, final: true, count: 64), Self.set(pass: pass, final: true, count: 64, runs: [3..<4])]
        }
        fake.badSent.store(true, ordering: .relaxed)
        expectFailure(try failedSession(fake), containing: "does not match")
    }

    /// Precopy pages nobody asked for after the final set (in answer to a
    /// background request): never installed.
    @Test(.timeLimit(.minutes(1)))
    func precopyPagesAfterTheFinalSetFailTheSession() throws {
        let sent = Atomic<Bool>(false)
        let fake = try FakePrecopySource(pages: 64, passReply: { pass in [Self.set(pass: pass, final: true, count: 64)] }) { r in
            sent.store(true, ordering: .relaxed)
            var bad = r
            bad.pageClass = .precopy
            return HostileSourceTests.pageData(bad)
        }
        let t = PThread(name: "watch") { while !sent.load(ordering: .relaxed) { usleep(1000) }; fake.badSent.store(true, ordering: .relaxed) }
        expectFailure(try failedSession(fake), containing: "not requested")
        t.join()
    }

    @Test(.timeLimit(.minutes(1)))
    func precopyPagesOutsideTheRegionsFailTheSession() throws {
        let fake = try FakePrecopySource(pages: 64, passReply: { pass in
            [Self.set(pass: pass, final: pass > 1, count: 64, runs: pass == 1 ? [0..<4] : [])]
        }) { r in HostileSourceTests.pageData(r, region: 9) }
        fake.badSent.store(true, ordering: .relaxed)
        expectFailure(try failedSession(fake), containing: "does not exist")
    }
}
