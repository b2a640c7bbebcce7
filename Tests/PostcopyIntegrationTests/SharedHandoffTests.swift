import CPostcopy
import Foundation
import PostcopyCore
import PostcopyHandoff
import PostcopySource
import PostcopyTesting
import PostcopyTransport
import Synchronization
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// The handoff extension: guest RAM in a shared memory file handed over with the
/// userfaultfd; the daemon writes pages through its alias and maps them with
/// UFFDIO_CONTINUE (never UFFDIO_COPY).
@Suite("VMM handoff with shared memory (UFFDIO_CONTINUE)", .serialized,
       .enabled(if: uffdSkipReason == nil, "userfaultfd unavailable (reason printed above)"))
struct SharedHandoffTests {
    @Test(.timeLimit(.minutes(2)))
    func sharedMemoryMigratesEveryByteByContinue() throws {
        let size = 12 << 20
        let mem = try TempMemory(size: size, zeroPercent: 30, seed: 41)
        let source = try startServer(mem)
        defer { source.stop() }
        let daemon = try startHandoff(port: source.port)
        defer { daemon.stop() }
        // Three regions at offsets 0, 3 MiB and 7 MiB of one memfd.
        let vmm = try TestVMM(size: size, splits: [3 << 20, 4 << 20], shared: true)
        let r = try migrateThroughDaemon(vmm, daemon, expected: Array(mem.mapping.bytes), threads: 4)
        #expect(r?.completed == true)
        #expect(r?.installPath == "continue")
        #expect(r?.pagesCopied == 0, "pages went through UFFDIO_COPY on the shared-memory path")
        #expect((r?.pagesContinued ?? 0) > 0)
        #expect(source.stats.pagesSentTwice.load(ordering: .relaxed) == 0)
    }

    /// MADV_REMOVE (punch) and MADV_DONTNEED by the VMM on shared memory: both
    /// ranges read zero from then on and are never filled from the source again,
    /// even by a reply in flight when the remove came; the rest arrives intact.
    @Test(.timeLimit(.minutes(2)))
    func removedSharedPagesReadZeroAndAreNeverRefilled() throws {
        let size = 8 << 20
        let mem = try TempMemory(size: size, zeroPercent: 0, seed: 42)
        let source = try startServer(mem)
        defer { source.stop() }
        let daemon = try startHandoff(port: source.port, rate: 2 << 20)  // the removes land mid-migration
        defer { daemon.stop() }
        let vmm = try TestVMM(size: size, shared: true)
        try vmm.handOver(daemon.path)
        let base = vmm.mappings[0].base
        for off in stride(from: 0, to: 2 << 20, by: 4096) { _ = cpc_touch_read(base + off) }
        let punched = (1 << 20)..<(3 << 20)  // half present, half missing
        let dropped = (5 << 20)..<(6 << 20)
        #expect(madvise(base + punched.lowerBound, punched.count, MADV_REMOVE) == 0)
        #expect(madvise(base + dropped.lowerBound, dropped.count, MADV_DONTNEED) == 0)
        vmm.touchAll(threads: 2)
        #expect(waitFor("completion") { daemon.stats.completed.load(ordering: .relaxed) == 1 })
        let got = vmm.contents()
        let want = Array(mem.mapping.bytes)
        for removed in [punched, dropped] {
            #expect(got[removed].allSatisfy { $0 == 0 }, "a removed page (\(removed)) was filled from the source")
        }
        #expect(got[..<punched.lowerBound] == want[..<punched.lowerBound])
        #expect(got[punched.upperBound..<dropped.lowerBound] == want[punched.upperBound..<dropped.lowerBound])
        #expect(got[dropped.upperBound...] == want[dropped.upperBound...])
        vmm.goAway()
        #expect(waitFor("session end") { daemon.stats.ended.load(ordering: .relaxed) == 1 })
        let r = daemon.stats.reports.withLock { $0.first }
        #expect((r?.removeEvents ?? 0) >= 2)
        #expect(r?.pagesCopied == 0)
        print("REMOVE on shared memory: \(r?.removedInFlight ?? 0) removed pages had a fetch in flight (zeroed once their reply landed)")
    }

    /// Pages removed (punched out of the memory file) before the stream
    /// starts are zero pages to it, held unmapped like the others when the
    /// file was fresh; a guest touching one while its block is still
    /// registered must get it mapped. UFFDIO_CONTINUE cannot map a hole
    /// (EFAULT): such a page is allocated again before it is held. (The
    /// engine failed here, and the touch waited forever, when fresh-file zero
    /// pages were held without a look at the page cache.)
    @Test(.timeLimit(.minutes(2)))
    func pagesRemovedBeforeTheStreamAreMappedWhenTouched() throws {
        let size = 8 << 20
        let mem = try TempMemory(size: size, zeroPercent: 0, seed: 47)
        // A source whose guest has not paused yet: the stream waits for it.
        let sm = try SourceMemory(mapping: mem.mapping, pageSize: 4096)
        let source = try PageServer(memory: sm, listen: Endpoint(host: "127.0.0.1", port: 0), exitAfterCompletion: false,
                                    logger: testLogger("test.source"))
        source.start()
        defer { source.stop() }
        // Slow, so that the block stays registered (not every page in) for seconds.
        let daemon = try startHandoff(port: source.port, rate: 1 << 20)
        defer { daemon.stop() }
        let vmm = try TestVMM(size: size, shared: true)
        try vmm.handOver(daemon.path)
        let base = vmm.mappings[0].base
        let removed = (2 << 20)..<(4 << 20)
        #expect(madvise(base + removed.lowerBound, removed.count, MADV_REMOVE) == 0)
        sm.freeze(deviceState: [])
        // The stream starts: the removed pages are zero pages, held ahead of the guest.
        usleep(300_000)
        let done = Atomic<Bool>(false)
        let address = UInt(bitPattern: base)
        let toucher = PThread(name: "vmm-vcpu0") {
            let base = UnsafeRawPointer(bitPattern: address)!
            for off in stride(from: removed.lowerBound, to: removed.upperBound, by: 64 << 10) { _ = cpc_touch_read(base + off) }
            done.store(true, ordering: .releasing)
        }
        let answered = waitFor("the removed pages' faults answered", timeoutMs: 15_000) { done.load(ordering: .acquiring) }
        #expect(answered, "a fault on a removed page was never answered: \(daemon.stats.reports.withLock { $0.first?.error ?? "" })")
        guard answered else { return }  // (its thread stays parked on the page)
        toucher.join()
        #expect(waitFor("completion") { daemon.stats.completed.load(ordering: .relaxed) == 1 })
        let got = vmm.contents()
        let want = Array(mem.mapping.bytes)
        #expect(got[removed].allSatisfy { $0 == 0 }, "a removed page was filled from the source")
        #expect(got[..<removed.lowerBound] == want[..<removed.lowerBound])
        #expect(got[removed.upperBound...] == want[removed.upperBound...])
        vmm.goAway()
        #expect(waitFor("session end") { daemon.stats.ended.load(ordering: .relaxed) == 1 })
        let r = daemon.stats.reports.withLock { $0.first }
        #expect(r?.error == nil)
        print("pages removed before the stream: \(r?.streamedPagesHeld ?? 0) held, \(r?.zeroPagesMappedAhead ?? 0) zero pages mapped ahead")
    }

    /// A remove that hits pages whose replies are landing (a proxy forwards
    /// each reply's headers and half its payload, then the rest 150 ms later),
    /// on the continue path, where those payloads are received straight into
    /// the alias: the pages stay in flight until their reply is in, then read
    /// zero; nothing from the source shows through (were a removed page zeroed
    /// and mapped at once, the rest of its reply would land over it), and the
    /// rest of memory arrives intact.
    @Test(.timeLimit(.minutes(2)))
    func aRemoveOfPagesInFlightLeavesThemZero() throws {
        let size = 8 << 20
        let mem = try TempMemory(size: size, zeroPercent: 0, seed: 45)
        let source = try startServer(mem)
        defer { source.stop() }
        let proxy = try ChaosProxy(target: Endpoint(host: "127.0.0.1", port: source.port),
                                   fault: ResponseFault(.split, every: 1, delayMs: 150, limit: 6))
        defer { proxy.stop() }
        let daemon = try startHandoff(port: proxy.port)
        defer { daemon.stop() }
        let vmm = try TestVMM(size: size, shared: true)
        try vmm.handOver(daemon.path)
        let base = vmm.mappings[0].base
        // The first background batch is requested at once; its reply is half in.
        #expect(waitFor("a reply landing") { proxy.affected >= 1 })
        usleep(30_000)
        let removed = 0..<(4 << 20)
        #expect(madvise(base + removed.lowerBound, removed.count, MADV_REMOVE) == 0)
        vmm.touchAll(threads: 2)
        #expect(waitFor("completion") { daemon.stats.completed.load(ordering: .relaxed) == 1 })
        let got = vmm.contents()
        let want = Array(mem.mapping.bytes)
        #expect(got[removed].allSatisfy { $0 == 0 }, "a removed page was filled from the source")
        #expect(got[removed.upperBound...] == want[removed.upperBound...])
        vmm.goAway()
        #expect(waitFor("session end") { daemon.stats.ended.load(ordering: .relaxed) == 1 })
        let r = daemon.stats.reports.withLock { $0.first }
        print("REMOVE of pages in flight: \(r?.removedInFlight ?? 0) removed pages had a fetch in flight, \(r?.pagesReceivedInPlace ?? 0) pages received in place")
        #expect((r?.removedInFlight ?? 0) > 0, "the remove must really hit pages in flight")
        #expect(r?.pagesCopied == 0)
    }

    /// Each bad extended handoff is refused with its reason, while another VMM's
    /// migration goes on; that VMM completes with every byte.
    @Test(.timeLimit(.minutes(2)))
    func badSharedMemoryHandoffsAreRefusedAndOthersKeepBeingServed() throws {
        let size = 4 << 20
        let mem = try TempMemory(size: size, zeroPercent: 10, seed: 44)
        let source = try startServer(mem)
        defer { source.stop() }
        // The reasons a daemon's caller hears (`dest --handoff --json` emits
        // them as "refused" events; `migrate` stops on one with the reason).
        let told = Locked<[String]>([])
        let daemon = try startHandoff(port: source.port, rate: 4 << 20, onRejected: { _, why in told.withLock { $0.append(why) } })
        defer { daemon.stop() }
        let good = try TestVMM(size: size, shared: true)
        try good.handOver(daemon.path)
        _ = cpc_touch_read(good.mappings[0].base)

        func memfd(_ bytes: Int) throws -> OwnedFD {
            let fd = cpc_memfd_create("bad", CPC_MFD_CLOEXEC)
            guard fd >= 0, ftruncate(fd, off_t(bytes)) == 0 else { throw SystemError("memfd", errno: errno) }
            return OwnedFD(fd)
        }
        let diskPath = "/var/tmp/postcopy-test-\(getpid()).ram"
        let disk = open(diskPath, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        defer { close(disk); unlink(diskPath) }
        #expect(ftruncate(disk, off_t(size)) == 0)
        let small = try memfd(size / 2), spare = try memfd(size)
        let events = try EventFD()

        typealias Case = (name: String, vmm: TestVMM, regions: [VMMRegion]?, files: [Int32]?, needle: String)
        func shared(_ splits: [Int] = [], minor: Bool = true) throws -> TestVMM {
            try TestVMM(size: size, splits: splits, shared: true, minor: minor)
        }
        let a = try shared(), b = try shared(), c = try shared(), d = try shared([size / 2])
        let e = try shared([size / 2]), f = try shared(minor: false), g = try shared(), h = try shared()
        let cases: [Case] = [
            ("an eventfd as the memory file", a, nil, [events.fd.raw], "not shareable memory"),
            ("a file on disk as the memory file", b, nil, [disk], "neither tmpfs/memfd nor hugetlbfs"),
            ("a file smaller than its region", c, nil, [small.raw], "smaller than region 0 needs"),
            ("an offset past the file's end", d, d.regions.enumerated().map { i, r in
                var r = r; if i == 1 { r.file = .init(index: 0, offset: UInt64(size)) }; return r }, nil, "past the end"),
            ("overlapping file ranges", e, e.regions.map { r in var r = r; r.file = .init(index: 0, offset: 0); return r }, nil, "overlap in memory file"),
            ("no MINOR registration", f, nil, nil, "not registered in MINOR mode"),
            ("an fd no region names", g, nil, [g.file!.raw, spare.raw], "memory file 1 is named by no region"),
            ("a region naming a file that did not come", h, nil, [], "only 0 came"),
            ("regions naming each other's file offsets", d, d.regions.enumerated().map { i, r in
                var r = r; r.file = .init(index: 0, offset: i == 0 ? UInt64(size / 2) : 0); return r }, nil, "from file offset"),
        ]
        var rejections: UInt64 = 0
        for c in cases {
            try c.vmm.handOver(daemon.path, json: c.regions.map { HandoffMessage.encode($0) },
                               fds: c.files.map { [c.vmm.uffd.fd.raw] + $0 })
            rejections += 1
            #expect(c.vmm.closedByDaemon(), "\(c.name): the daemon kept the connection")
            #expect(waitFor(c.name) { daemon.stats.rejected.load(ordering: .relaxed) == rejections })
            let why = daemon.stats.lastRejection.withLock { $0 } ?? ""
            #expect(why.contains(c.needle), "\(c.name): refused with '\(why)'")
            #expect(told.withLock { $0.last } == why, "\(c.name): the caller was not told the reason")
            c.vmm.goAway()
        }
        // The good VMM was served all along.
        good.touchAll(threads: 2)
        #expect(waitFor("completion") { daemon.stats.completed.load(ordering: .relaxed) == 1 })
        #expect(good.contents() == Array(mem.mapping.bytes))
    }

    /// The firecracker-format message (anonymous memory, the uffd alone) keeps
    /// today's UFFDIO_COPY path.
    @Test(.timeLimit(.minutes(2)))
    func plainFirecrackerMessageKeepsTheCopyPath() throws {
        let mem = try TempMemory(size: 4 << 20, zeroPercent: 20, seed: 45)
        let source = try startServer(mem)
        defer { source.stop() }
        let daemon = try startHandoff(port: source.port)
        defer { daemon.stop() }
        let r = try migrateThroughDaemon(TestVMM(size: 4 << 20), daemon, expected: Array(mem.mapping.bytes))
        #expect(r?.installPath == "copy")
        #expect(r?.pagesContinued == 0)
        #expect((r?.pagesCopied ?? 0) > 0)
    }
}
