import CPostcopy
import Foundation
import PostcopyCore
import PostcopyDestination
import PostcopyHandoff
import PostcopySource
import PostcopyTransport
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// The stream's pages held unmapped in the alias on the continue path, their
/// blocks leaving the userfaultfd once full (`LazyStreamMapping.swift`):
/// against the same migration with every page mapped by CONTINUE, and with a
/// guest reading held pages before their block leaves.
@Suite("streamed pages held unmapped, released by block", .serialized,
       .enabled(if: uffdSkipReason == nil, "userfaultfd unavailable (reason printed above)"))
struct LazyStreamMappingTests {
    static func daemon(port: Int, lazy: Bool, rate: Int = 0) throws -> HandoffServer {
        var config = EngineConfig()
        config.mapStreamLazily = lazy
        config.backgroundRate = rate
        config.prefetch = .off
        let server = try HandoffServer(path: socketPath(), source: Endpoint(host: "127.0.0.1", port: port),
                                       engineConfig: config, logger: testLogger("test.handoff"))
        server.start()
        return server
    }

    /// The stream alone brings every page in. Held: most non-zero pages are
    /// never CONTINUEd, their blocks left the userfaultfd, and the guest's
    /// memory is the source's (read through the VMM's mapping, which faults
    /// on nothing any more there). Not held: every non-zero page CONTINUEd.
    @Test(.timeLimit(.minutes(2)), arguments: [true, false])
    func streamedPagesLeaveTheUserfaultfdByBlock(lazy: Bool) throws {
        let size = 24 << 20
        let mem = try TempMemory(size: size, zeroPercent: 20, seed: 61)
        let source = try startServer(mem)
        defer { source.stop() }
        let daemon = try Self.daemon(port: source.port, lazy: lazy)
        defer { daemon.stop() }
        let vmm = try TestVMM(size: size, shared: true)
        try vmm.handOver(daemon.path)
        #expect(waitFor("completion") { daemon.stats.completed.load(ordering: .relaxed) == 1 })
        #expect(vmm.contents() == Array(mem.mapping.bytes), "guest memory differs from the source")
        vmm.goAway()
        #expect(waitFor("session end") { daemon.stats.ended.load(ordering: .relaxed) == 1 })
        let r = try #require(daemon.stats.reports.withLock { $0.first })
        let nonZero = UInt64(size / 4096) - UInt64(r.zeroPages)
        print("held \(lazy): \(r.streamedPagesHeld) held, \(r.streamedPagesReleased) released by block, \(r.pagesContinued) CONTINUEd, \(nonZero) non-zero")
        #expect(r.pagesCopied == 0)
        if lazy {
            #expect(r.streamedPagesHeld > 0)
            #expect(r.streamedPagesReleased >= nonZero / 2, "most streamed pages left with their block")
            #expect(r.pagesContinued < nonZero / 2, "most non-zero pages were still mapped by CONTINUE")
        } else {
            #expect(r.streamedPagesHeld == 0 && r.streamedPagesReleased == 0)
            #expect(r.pagesContinued >= nonZero)
        }
    }

    /// A VMM hands over a file that holds old bytes (a reused memory file):
    /// zero pages cannot be held on the strength of a fresh file
    /// (`SharedAlias.zeroAtStart` is false for it), and each reads zero in
    /// the guest, as every other page reads the source's.
    @Test(.timeLimit(.minutes(2)))
    func aFileWithOldBytesGetsItsZeroPagesWritten() throws {
        let size = 16 << 20
        let mem = try TempMemory(size: size, zeroPercent: 30, seed: 63)
        let source = try startServer(mem)
        defer { source.stop() }
        let daemon = try Self.daemon(port: source.port, lazy: true)
        defer { daemon.stop() }
        let vmm = try TestVMM(size: size, shared: true)
        let fd = try #require(vmm.file).raw
        let old = [UInt8](repeating: 0xAB, count: size)
        #expect(old.withUnsafeBytes { pwrite(fd, $0.baseAddress, size, 0) } == size)
        try vmm.handOver(daemon.path)
        #expect(waitFor("completion") { daemon.stats.completed.load(ordering: .relaxed) == 1 })
        let seen = vmm.contents(), expected = Array(mem.mapping.bytes)
        let differing = (0..<(size / 4096)).filter { seen[($0 * 4096)..<(($0 + 1) * 4096)] != expected[($0 * 4096)..<(($0 + 1) * 4096)] }
        let (count, first) = (differing.count, Array(differing.prefix(8)))
        #expect(count == 0, "\(count) pages differ from the source's, first \(first)")
        vmm.goAway()
        #expect(waitFor("session end") { daemon.stats.ended.load(ordering: .relaxed) == 1 })
        let r = try #require(daemon.stats.reports.withLock { $0.first })
        print("held, old bytes in the file: \(r.zeroPages) zero pages, \(r.streamedPagesHeld) held, \(r.pagesContinued) CONTINUEd")
        #expect(r.zeroPages > 0)
    }

    /// A slow stream (8 MiB/s) and guest threads reading every page while it
    /// runs: held pages the guest touches are mapped on its fault (with the
    /// held pages around them), the rest leave with their block; every page
    /// the guest read, as it read it, is the source's.
    @Test(.timeLimit(.minutes(2)))
    func aGuestReadingHeldPagesSeesTheSourcesBytes() throws {
        let size = 16 << 20
        let mem = try TempMemory(size: size, zeroPercent: 10, seed: 62)
        let source = try startServer(mem)
        defer { source.stop() }
        let daemon = try Self.daemon(port: source.port, lazy: true, rate: 8 << 20)
        defer { daemon.stop() }
        let vmm = try TestVMM(size: size, shared: true)
        try vmm.handOver(daemon.path)
        // Let the stream hold some pages first, then read everything.
        usleep(300_000)
        let expected = Array(mem.mapping.bytes)
        let differing = Locked<[Int]>([])
        let base = UInt(bitPattern: vmm.mappings[0].base)
        let readers = (0..<2).map { t in
            PThread(name: "guest-vcpu") {
                let base = UnsafeRawPointer(bitPattern: base)!
                for p in stride(from: t, to: size / 4096, by: 2) {
                    let seen = UnsafeRawBufferPointer(start: base + p * 4096, count: 4096)
                    if !seen.elementsEqual(expected[(p * 4096)..<((p + 1) * 4096)]) { differing.withLock { $0.append(p) } }
                }
            }
        }
        readers.forEach { $0.join() }
        #expect(differing.withLock { $0 }.isEmpty, "pages read with other bytes than the source's: \(differing.withLock { $0.prefix(8) })")
        #expect(waitFor("completion") { daemon.stats.completed.load(ordering: .relaxed) == 1 })
        #expect(vmm.contents() == expected)
        vmm.goAway()
        #expect(waitFor("session end") { daemon.stats.ended.load(ordering: .relaxed) == 1 })
        let r = try #require(daemon.stats.reports.withLock { $0.first })
        print("held, guest reading: \(r.streamedPagesHeld) held, \(r.streamedPagesReleased) released by block, \(r.pagesContinued) CONTINUEd, \(r.faults) faults")
        #expect(r.streamedPagesHeld > 0, "the stream held no page before the guest read")
    }
}
