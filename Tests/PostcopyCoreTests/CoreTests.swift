import Histogram
import Testing
#if canImport(Glibc)
import Glibc
#endif
import CPostcopy
@testable import PostcopyCore

@Suite("core model")
struct CoreTests {
    /// Percentiles are read off what was recorded: a known distribution gives
    /// known percentiles, and a different one gives different ones.
    @Test func percentilesComeFromRecordedData() {
        let r = LatencyRecorder()
        for us in 1...1000 { r.record(nanoseconds: UInt64(us) * 1000) }
        let s = r.snapshot()
        #expect(s.count == 1000)
        #expect((499_000...501_000).contains(s.p50Ns), "p50 \(s.p50Ns)")
        #expect((989_000...991_000).contains(s.p99Ns), "p99 \(s.p99Ns)")
        #expect((999_000...1_001_000).contains(s.maxNs))
        #expect(r.totalNanoseconds == 500_500_000)
        let other = LatencyRecorder()
        for _ in 0..<10 { other.record(nanoseconds: 7_000) }
        #expect(other.snapshot().p50Ns != s.p50Ns)
        // Merging per-thread recorders keeps every sample.
        let merged = LatencySummary(LatencyRecorder.merged([r, other]))
        #expect(merged.count == 1010)
        let cdf = latencyCDF(LatencyRecorder.merged([r]))
        #expect(cdf.first?[0] == 0 && cdf.last?[0] == 100)
        #expect(zip(cdf, cdf.dropFirst()).allSatisfy { $0[1] <= $1[1] }, "a CDF never goes down")
        #expect(LatencySummary(Histogram<UInt64>(highestTrackableValue: 1000, numberOfSignificantValueDigits: .three)).count == 0)
    }

    @Test func byteSizes() {
        #expect(parseByteSize("4096") == 4096)
        #expect(parseByteSize("64K") == 64 << 10)
        #expect(parseByteSize("1G") == 1 << 30)
        #expect(parseByteSize("1GiB") == 1 << 30)
        #expect(parseByteSize("2m") == 2 << 20)
        #expect(parseByteSize("-1") == nil)
        #expect(parseByteSize("lots") == nil)
        #expect(parseByteSize("99999999999T") == nil)
    }

    @Test func digestSeesEveryByte() throws {
        let m = try MemoryMapping.anonymous(length: 3 << 20)
        let d0 = MemoryDigest.compute(regions: [m.bytes])
        #expect(MemoryDigest.compute(regions: [m.bytes], threads: 1) == d0)
        (m.base + (3 << 20) - 1).storeBytes(of: 1, as: UInt8.self)
        #expect(MemoryDigest.compute(regions: [m.bytes]) != d0)
    }
}

@Suite("resident memory")
struct ResidentMemoryTests {
    @Test func sharedFileMappingsAreRecognizedFromSmapsHeaders() {
        #expect(ResidentMemory.isSharedFileMapping("7f0a3c000000-7f0a4c000000 rw-s 00000000 00:01 1035                       /memfd:guest-ram (deleted)\n"))
        #expect(ResidentMemory.isSharedFileMapping("7f0a3c000000-7f0a4c000000 r--s 00000000 00:2f 7   /dev/hugepages/vm0\n"))
        #expect(!ResidentMemory.isSharedFileMapping("7f0a3c000000-7f0a4c000000 rw-p 00000000 00:01 1035   /memfd:x (deleted)\n"))
        #expect(!ResidentMemory.isSharedFileMapping("7f0a3c000000-7f0a4c000000 rw-s 00000000 00:00 0\n"))
        #expect(!ResidentMemory.isSharedFileMapping("7ffd1000-7ffd2000 rw-p 00000000 00:00 0                          [stack]\n"))
    }

    /// A shared memfd mapping, touched whole, is left out with `sharedFiles`
    /// and counted without.
    @Test func aTouchedSharedMemfdIsLeftOut() throws {
        let size = 32 << 20
        let fd = cpc_memfd_create("rss-test", 0)
        #expect(fd >= 0)
        defer { close(fd) }
        #expect(ftruncate(fd, off_t(size)) == 0)
        let p = mmap(nil, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)!
        defer { munmap(p, size) }
        memset(p, 1, size)
        // One walk: other tests running meanwhile move the totals, not their difference.
        let w = ResidentMemory.walk([])
        #expect(w.outside - w.outsideSharedFiles >= size, "all \(w.outside), without shared files \(w.outsideSharedFiles)")
    }
}

@Suite("growth cursor")
struct GrowthCursorTests {
    /// What a metrics counter adds from a source counter: its growth, never
    /// a negative step when a reading comes in lower (a counter reset or a
    /// reading of a closed connection's total that went away).
    @Test func growthOnlyAndNeverBackwards() {
        var c = GrowthCursor()
        #expect(c.growth(to: 5) == 5)
        #expect(c.growth(to: 5) == 0)
        #expect(c.growth(to: 3) == 0)
        #expect(c.growth(to: 7) == 2)
        #expect(c.last == 7)
    }
}
