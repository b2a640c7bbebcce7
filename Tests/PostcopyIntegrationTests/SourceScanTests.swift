import CPostcopy
import PostcopyCore
import PostcopySource
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// The source's scan of frozen RAM in a memory file: holes are zero pages it
/// never reads (a read through the mapping would allocate them), and its
/// digests are the ones a destination computes over the same bytes.
@Suite("Source scan of a memory file with holes")
struct SourceScanTests {
    /// 6 MiB memfd, 4 KiB pages: data pages, pages of written zeros, holes,
    /// a 1 MiB chunk wholly a hole, chunks mixing holes and data.
    @Test func holesAreZeroPagesLeftUntouchedAndTheDigestsMatch() throws {
        let pageSize = 4096, size = 6 << 20, pages = size / pageSize
        let memory = try MemoryMapping.sharedMemfd(length: size, name: "scan-test")
        var rng = SplitMix64(seed: 11)
        var expectedZero = Set<Int>()
        var holes = Set<Int>()
        for p in 0..<pages {
            let page = memory.guest.base + p * pageSize
            let chunk = (p * pageSize) >> 20
            if chunk == 2 || (chunk != 0 && p % 3 == 0) {
                holes.insert(p)  // never touched: a hole of the file
                expectedZero.insert(p)
            } else if p % 7 == 0 {
                page.storeBytes(of: 0, as: UInt64.self)  // allocated, all zeros
                expectedZero.insert(p)
            } else {
                for w in stride(from: 0, to: pageSize, by: 8) { page.storeBytes(of: rng.next(), toByteOffset: w, as: UInt64.self) }
            }
        }
        let source = try SourceMemory(mapping: memory.guest, pageSize: pageSize, file: memory.file.raw)
        source.freeze(deviceState: [])
        let zeros = try #require(source.waitForZeroPages(timeoutMs: 10_000))
        #expect(zeros.count == expectedZero.count)
        #expect((0..<pages).filter { zeros.contains($0) } == expectedZero.sorted())
        let scan = try #require(source.waitForScan(timeoutMs: 10_000))
        #expect(holes.count > 256 + 64)  // the layout above has holes to skip
        // The scan left every hole a hole.
        for p in holes.sorted() {
            let next = lseek(memory.file.raw, off_t(p * pageSize), 3 /* SEEK_DATA */)
            #expect(next < 0 || Int(next) >= (p + 1) * pageSize, "page \(p) was allocated by the scan")
        }
        // Same digests as over the bytes themselves (reading the holes now is fine).
        let copy = try MemoryMapping.anonymous(length: size)
        memcpy(copy.base, memory.guest.base, size)
        #expect(scan.digest == MemoryDigest.compute(regions: [copy.bytes]))
        for p in 0..<pages {
            #expect(scan.pageDigests[p] == cpc_xxh64(copy.base + p * pageSize, pageSize, 0), "page \(p)")
        }
    }
}
