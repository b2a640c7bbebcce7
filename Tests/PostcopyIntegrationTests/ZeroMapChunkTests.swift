import CPostcopy
import Foundation
import PostcopyCore
import PostcopyHandoff
import PostcopySource
import PostcopyTransport
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// The zero map by chunks of 32 MiB (`ZeroPass` at the source, `ZeroMapChunks`
/// at the destination): a zero map waits only for the chunks it covers, and
/// the background stream starts on the first chunk's map instead of waiting
/// for the source to scan all of RAM. Here the source's own pass is held back
/// for seconds per chunk, so only the chunks somebody asks for get done.
@Suite("zero maps by chunk", .serialized, .enabled(if: uffdSkipReason == nil, "userfaultfd unavailable (reason printed above)"))
struct ZeroMapChunkTests {
    static let pageSize = 4096, chunk = 8192

    /// RAM in a memfd: data pages, pages of written zeros and holes, in
    /// every chunk but the third, which is wholly a hole. Returns the zero pages.
    static func fill(_ ram: MemoryMapping, seed: UInt64) -> Set<Int> {
        var rng = SplitMix64(seed: seed)
        var zero = Set<Int>()
        for p in 0..<(ram.length / pageSize) {
            let page = ram.base + p * pageSize
            if p / chunk == 2 || p % 5 == 1 {
                zero.insert(p)  // a hole
            } else if p % 7 == 3 {
                page.storeBytes(of: 0, as: UInt64.self)  // allocated, all zeros
                zero.insert(p)
            } else {
                for w in stride(from: 0, to: pageSize, by: 512) { page.storeBytes(of: rng.next() | 1, toByteOffset: w, as: UInt64.self) }
            }
        }
        return zero
    }

    /// Maps asked for out of order and across chunk edges are exact (holes,
    /// written zeros, data), come while the pass's own thread has done nothing,
    /// and leave every hole a hole.
    @Test(.timeLimit(.minutes(1)))
    func aZeroMapWaitsOnlyForItsOwnChunks() throws {
        let size = 5 * Self.chunk * Self.pageSize  // 160 MiB, mostly holes
        let shared = try MemoryMapping.sharedMemfd(length: size, name: "zero-chunks")
        let zero = Self.fill(shared.guest, seed: 5)
        let source = try SourceMemory(mapping: shared.guest, pageSize: Self.pageSize, file: shared.file.raw)
        source.slowZeroPassForTests(microsecondsPerChunk: 60_000_000)
        source.freeze(deviceState: [])
        let asks = [(3 * Self.chunk, 100), (Self.chunk - 50, 100), (4 * Self.chunk, Self.chunk), (0, Self.chunk), (2 * Self.chunk + 7, 9000)]
        for (first, count) in asks {
            let isZero = try #require(source.zeroBits(globalFirst: first, count: count))
            let wrong = (first..<(first + count)).filter { isZero($0) != zero.contains($0) }
            #expect(wrong.isEmpty, "pages \(first)+\(count): \(wrong.count) wrong, the first \(wrong.prefix(5))")
            #expect(source.zeroPageCount == nil, "the whole pass was done: the map may have waited for it")
        }
        for p in zero.sorted() where p / Self.chunk == 2 || p % 5 == 1 {
            let next = lseek(shared.file.raw, off_t(p * Self.pageSize), 3 /* SEEK_DATA */)
            #expect(next < 0 || Int(next) >= (p + 1) * Self.pageSize, "hole page \(p) was allocated by the scan")
        }
    }

    /// A migration through the handoff daemon, the stream alone bringing the
    /// pages in, completes byte-exact with the zero pages mapped from the maps,
    /// asked for a chunk at a time as the stream got there, before the source's
    /// own pass is done (it would take 30 s). (Before, the daemon asked for the
    /// map of all of RAM first, and the source answered after its whole pass.)
    @Test(.timeLimit(.minutes(2)))
    func theStreamStartsBeforeTheSourceScannedAllOfRAM() throws {
        let size = 2 * Self.chunk * Self.pageSize + (4 << 20)  // 68 MiB: three chunks, the last a short one
        let shared = try MemoryMapping.sharedMemfd(length: size, name: "zero-chunks-ram")
        _ = Self.fill(shared.guest, seed: 9)
        let expected = Array(shared.guest.bytes)
        let memory = try SourceMemory(mapping: shared.guest, pageSize: Self.pageSize, file: shared.file.raw)
        memory.slowZeroPassForTests(microsecondsPerChunk: 10_000_000)
        memory.freeze(deviceState: [])
        let server = try PageServer(memory: memory, listen: Endpoint(host: "127.0.0.1", port: 0), exitAfterCompletion: false,
                                    logger: testLogger("test.source"))
        server.start()
        defer { server.stop() }
        let daemon = try startHandoff(port: server.port, prefetch: .off)
        defer { daemon.stop() }
        let vmm = try TestVMM(size: size, shared: true)
        let t0 = nowNanoseconds()
        try vmm.handOver(daemon.path)
        #expect(waitFor("completion") { daemon.stats.completed.load(ordering: .relaxed) == 1 })
        let passDone = memory.zeroPageCount != nil
        print("zero maps by chunk: every page in after \(Double(nowNanoseconds() - t0) / 1e6) ms; the source's own pass done: \(passDone)")
        #expect(!passDone, "the migration waited for the source's whole zero pass")
        #expect(vmm.contents() == expected, "guest memory differs from the source")
        vmm.goAway()
        #expect(waitFor("session end") { daemon.stats.ended.load(ordering: .relaxed) == 1 })
        let r = daemon.stats.reports.withLock { $0.first }
        #expect(r?.completed == true)
        #expect((r?.zeroPagesMappedAhead ?? 0) > 0, "no zero page was known from a map")
        // One chunk first, then the next two at once (`ZeroMapChunks.perFetch`).
        #expect(server.stats.zeroMaps.load(ordering: .relaxed) == 2, "the daemon asked for the zero map of all of RAM at once")
        print("zero maps by chunk: \(r?.zeroPages ?? 0) zero pages, \(r?.zeroPagesMappedAhead ?? 0) mapped ahead, \(r?.backgroundPages ?? 0) streamed")
    }
}
