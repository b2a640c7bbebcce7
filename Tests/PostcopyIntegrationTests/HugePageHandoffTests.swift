import Foundation
import PostcopyCore
import PostcopyHandoff
import Testing

/// Reserves `count` free 2 MiB huge pages (root); nil if possible, else why not.
func reserveHugePages(_ count: Int) -> String? {
    func read(_ path: String) -> Int { Int((try? String(contentsOfFile: path, encoding: .utf8))?.filter(\.isNumber) ?? "") ?? 0 }
    let total = "/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages"
    let free = "/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages"
    if read(free) >= count { return nil }
    let want = read(total) + count - read(free)
    try? "\(want)\n".write(toFile: total, atomically: false, encoding: .utf8)
    return read(free) >= count ? nil : "could not reserve \(count) huge pages of 2 MiB (free: \(read(free)))"
}

@Suite("VMM handoff with 2 MiB pages", .serialized, .enabled(if: uffdSkipReason == nil, "userfaultfd unavailable"))
struct HugePageHandoffTests {
    /// Anonymous hugetlbfs memory (UFFDIO_COPY of whole huge pages) and a
    /// hugetlbfs memfd handed over with the uffd (registered MINOR, mapped with
    /// UFFDIO_CONTINUE, no page copied).
    @Test(.timeLimit(.minutes(2)), arguments: [false, true])
    func hugetlbGuestMigratesWholeHugePages(shared: Bool) throws {
        if let why = reserveHugePages(8) {
            print("SKIP hugetlbGuestMigratesWholeHugePages(shared: \(shared)): \(why)")
            return
        }
        let size = 8 << 20
        let mem = try TempMemory(size: size, zeroPercent: 30, seed: 31)
        let source = try startServer(mem)
        defer { source.stop() }
        let daemon = try startHandoff(port: source.port)
        defer { daemon.stop() }
        let vmm = try TestVMM(size: size, splits: [2 << 20], huge: true, shared: shared)
        let r = try migrateThroughDaemon(vmm, daemon, expected: Array(mem.mapping.bytes))
        #expect(r?.completed == true)
        #expect(r?.installPath == (shared ? "continue" : "copy"))
        if shared { #expect(r?.pagesCopied == 0) }
        // Whole huge pages: every demand fetch is 512 source pages.
        #expect((r?.demandPages ?? 1) % 512 == 0, "demand pages \(r?.demandPages ?? 0)")
        #expect(source.stats.pagesSentTwice.load(ordering: .relaxed) == 0)
    }

    /// All-zero huge pages: hugetlbfs has no UFFDIO_ZEROPAGE, so they are filled
    /// by copying a zeroed 2 MiB page.
    @Test(.timeLimit(.minutes(2)))
    func zeroHugePagesAreFilledWithoutZeropage() throws {
        if let why = reserveHugePages(2) {
            print("SKIP zeroHugePagesAreFilledWithoutZeropage: \(why)")
            return
        }
        let mem = try TempMemory(size: 4 << 20, zeroPercent: 100)
        let source = try startServer(mem)
        defer { source.stop() }
        let daemon = try startHandoff(port: source.port)
        defer { daemon.stop() }
        let vmm = try TestVMM(size: 4 << 20, huge: true)
        let r = try migrateThroughDaemon(vmm, daemon, expected: [UInt8](repeating: 0, count: 4 << 20))
        #expect(r?.completed == true && r?.error == nil)
    }
}
