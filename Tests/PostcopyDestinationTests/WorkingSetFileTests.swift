import PostcopyDestination
import PostcopyWire
import Testing

/// The working-set file: what a restore trusts only after checking it.
@Suite("Working-set files")
struct WorkingSetFileTests {
    let sample = WorkingSet(pageSize: 4096, regionPages: [256, 512], recordedMs: 1500,
                            entries: [.init(page: 700, digest: 1), .init(page: 3, digest: 0xDEAD_BEEF), .init(page: 255, digest: 42)])

    @Test func roundTrip() throws {
        let back = try WorkingSet.decode(sample.encoded())
        #expect(back == sample)
        let empty = WorkingSet(pageSize: 4096, regionPages: [1], recordedMs: 0, entries: [])
        #expect(try WorkingSet.decode(empty.encoded()) == empty)
    }

    @Test func everyTruncationAndATrailingByteAreRefused() {
        let bytes = sample.encoded()
        for n in 0..<bytes.count {
            #expect(throws: WorkingSet.FormatError.self, "truncated to \(n) bytes") { try WorkingSet.decode(Array(bytes.prefix(n))) }
        }
        #expect(throws: WorkingSet.FormatError.self) { try WorkingSet.decode(bytes + [0]) }
    }

    @Test func anyFlippedByteIsRefused() {
        let bytes = sample.encoded()
        for i in bytes.indices {
            var b = bytes
            b[i] ^= 0x40
            #expect(throws: WorkingSet.FormatError.self, "byte \(i) flipped") { try WorkingSet.decode(b) }
        }
    }

    @Test func pagesOutOfRangeOrTwiceAreRefusedEvenWithAGoodChecksum() {
        var out = sample
        out.entries.append(.init(page: 768, digest: 0))  // 256 + 512 pages: 768 is past the end
        #expect(throws: WorkingSet.FormatError.self) { try WorkingSet.decode(out.encoded()) }
        var twice = sample
        twice.entries.append(.init(page: 3, digest: 9))
        #expect(throws: WorkingSet.FormatError.self) { try WorkingSet.decode(twice.encoded()) }
        var page = sample
        page.pageSize = 1000
        #expect(throws: WorkingSet.FormatError.self) { try WorkingSet.decode(page.encoded()) }
    }

    @Test func aFileForOtherMemoryDoesNotFit() {
        let same = RegionTable(pageSize: 4096, regions: [.init(size: 256 * 4096, sourceOffset: 0, name: "a"),
                                                         .init(size: 512 * 4096, sourceOffset: 256 * 4096, name: "b")])
        #expect(sample.mismatch(same) == nil)
        let bigger = RegionTable(pageSize: 4096, regions: [.init(size: 256 * 4096, sourceOffset: 0, name: "a"),
                                                           .init(size: 1024 * 4096, sourceOffset: 256 * 4096, name: "b")])
        #expect(sample.mismatch(bigger)?.contains("512") == true)
        let oneRegion = RegionTable(pageSize: 4096, regions: [.init(size: 768 * 4096, sourceOffset: 0, name: "a")])
        #expect(sample.mismatch(oneRegion) != nil, "same total size, another layout")
        let huge = RegionTable(pageSize: 8192, regions: [.init(size: 128 * 8192, sourceOffset: 0, name: "a"),
                                                         .init(size: 256 * 8192, sourceOffset: 128 * 8192, name: "b")])
        #expect(sample.mismatch(huge) != nil)
    }

    @Test func writeAndLoad() throws {
        let path = "/tmp/postcopy-ws-test-\(UInt64.random(in: 0...UInt64.max))"
        defer { _ = try? WorkingSet.load(from: "/nonexistent"); unlinkFile(path) }
        try sample.write(to: path)
        #expect(try WorkingSet.load(from: path) == sample)
        #expect(throws: WorkingSet.FormatError.self) { try WorkingSet.load(from: path + ".missing") }
    }
}

#if canImport(Glibc)
import Glibc
func unlinkFile(_ p: String) { unlink(p) }
#endif
