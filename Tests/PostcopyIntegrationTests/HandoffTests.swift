import CPostcopy
import Foundation
import PostcopyCore
import PostcopyDestination
import PostcopyHandoff
import PostcopySource
import PostcopyTransport
import PostcopyWire
import Synchronization
import Testing

/// A stand-in VMM that does exactly what Firecracker does for an external
/// page-fault handler: creates the uffd (with UFFD_FEATURE_EVENT_REMOVE),
/// registers each region MISSING, connects, and sends the JSON regions with the
/// uffd as the single SCM_RIGHTS fd in one sendmsg, keeping the socket open.
final class TestVMM: @unchecked Sendable {
    let mappings: [MemoryMapping]
    let regions: [VMMRegion]
    let uffd: Userfaultfd
    var client: VMMHandoffClient?
    /// With `shared`: the one memory file every region is mapped from (at its
    /// cumulative offset), registered MISSING | MINOR and handed over too.
    let file: OwnedFD?

    /// Guest memory of `size` bytes split into regions of `splits` bytes each (the
    /// last takes the rest); `huge`: 2 MiB hugetlbfs pages, as Firecracker's huge_pages "2M".
    /// `shared`: guest RAM is one memfd (hugetlb with `huge`), as QEMU's
    /// memory-backend-memfd; `minor: false` leaves out the MINOR registration
    /// (a VMM the daemon must refuse).
    init(size: Int, splits: [Int] = [], huge: Bool = false, sigbus: Bool = false, shared: Bool = false, minor: Bool = true) throws {
        let minorFeature = huge ? CPC_UFFD_FEATURE_MINOR_HUGETLBFS : CPC_UFFD_FEATURE_MINOR_SHMEM
        uffd = try Userfaultfd(features: CPC_UFFD_FEATURE_EVENT_REMOVE | (sigbus ? CPC_UFFD_FEATURE_SIGBUS : 0)
                               | (shared && minor ? minorFeature : 0))
        if shared {
            let raw = cpc_memfd_create("test-vmm-ram", CPC_MFD_CLOEXEC | (huge ? CPC_MFD_HUGETLB : 0))
            guard raw >= 0 else { throw SystemError("memfd_create", errno: -raw) }
            file = OwnedFD(raw)
            guard ftruncate(raw, off_t(size)) == 0 else { throw SystemError("ftruncate", errno: errno) }
        } else {
            file = nil
        }
        var maps: [MemoryMapping] = []
        var regs: [VMMRegion] = []
        var offset = 0
        for len in splits + [size - splits.reduce(0, +)] {
            let m: MemoryMapping
            if let file {
                m = try MemoryMapping.file(fd: file.raw, length: len, offset: offset, writable: true)
                if minor { try uffd.registerMissingAndMinor(m.range) } else { try uffd.registerMissing(m.range, hugetlb: huge) }
            } else {
                m = huge ? try MemoryMapping.anonymousHuge(length: len) : try MemoryMapping.anonymous(length: len)
                try uffd.registerMissing(m.range, hugetlb: huge)
            }
            maps.append(m)
            regs.append(VMMRegion(base: m.address, size: UInt64(len), offset: UInt64(offset), pageSize: huge ? 2 << 20 : 4096,
                                  file: file == nil ? nil : .init(index: 0, offset: UInt64(offset))))
            offset += len
        }
        mappings = maps
        regions = regs
    }

    /// Connects and sends `json` (default: the real regions) with `fds` (default: the uffd).
    func handOver(_ path: String, json: [UInt8]? = nil, fds: [Int32]? = nil) throws {
        let c = try VMMHandoffClient(path: path)
        client = c
        let files = file.map { [$0.raw] } ?? []
        if json == nil && fds == nil {
            try c.handOver(regions, uffd: uffd.fd.raw, files: files)
        } else {
            // Deliberately malformed handoffs go out as raw messages.
            try c.send(json ?? HandoffMessage.encode(regions), fds: fds ?? [uffd.fd.raw] + files)
        }
    }

    /// True when the daemon closed our socket within `ms`.
    func closedByDaemon(within ms: Int32 = 10_000) -> Bool { client?.closedByDaemon(within: ms) ?? false }

    func goAway() { client?.close() }

    /// Reads every page from `threads` threads in random order.
    func touchAll(threads: Int, seed: UInt64 = 3) {
        var pages: [UInt64] = []
        for m in mappings { for i in stride(from: 0, to: m.length, by: 4096) { pages.append(m.address + UInt64(i)) } }
        var rng = SplitMix64(seed: seed)
        pages.shuffle(using: &rng)
        let all = pages
        let ts = (0..<threads).map { t in
            PThread(name: "vmm-vcpu\(t)") {
                var i = t
                while i < all.count {
                    _ = cpc_touch_read(UnsafeRawPointer(bitPattern: UInt(all[i]))!)
                    i += threads
                }
            }
        }
        ts.forEach { $0.join() }
    }

    /// Guest memory as one contiguous copy (in offset order).
    func contents() -> [UInt8] {
        var out: [UInt8] = []
        for m in mappings { out += Array(m.bytes) }
        return out
    }
}

func waitFor(_ what: String, timeoutMs: Int = 30_000, _ cond: () -> Bool) -> Bool {
    let deadline = nowNanoseconds() + UInt64(timeoutMs) * 1_000_000
    while nowNanoseconds() < deadline {
        if cond() { return true }
        usleep(5_000)
    }
    print("timed out waiting for \(what)")
    return false
}

/// Hands `vmm` over, touches every page from `threads` threads, waits for the
/// daemon to complete, checks every byte, lets the VMM go and returns its report.
func migrateThroughDaemon(_ vmm: TestVMM, _ daemon: HandoffServer, expected: [UInt8], threads: Int = 2) throws -> HandoffSessionReport? {
    let ended = daemon.stats.ended.load(ordering: .relaxed)
    let completed = daemon.stats.completed.load(ordering: .relaxed)
    try vmm.handOver(daemon.path)
    vmm.touchAll(threads: threads)
    #expect(waitFor("completion") { daemon.stats.completed.load(ordering: .relaxed) == completed + 1 })
    #expect(vmm.contents() == expected, "guest memory differs from the source")
    vmm.goAway()
    #expect(waitFor("session end") { daemon.stats.ended.load(ordering: .relaxed) == ended + 1 })
    return daemon.stats.reports.withLock { $0.last }
}

func socketPath() -> String { "/tmp/postcopy-handoff-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).sock" }

func startHandoff(port: Int, rate: Int = 0, background: Bool = true, prefetch: PrefetchMode = .adaptive,
                  onRejected: (@Sendable (Int32, String) -> Void)? = nil) throws -> HandoffServer {
    var config = EngineConfig()
    config.prefetch = prefetch
    config.backgroundRate = rate
    config.background = background
    let server = try HandoffServer(path: socketPath(), source: Endpoint(host: "127.0.0.1", port: port),
                                   engineConfig: config, logger: testLogger("test.handoff"), onRejected: onRejected)
    server.start()
    return server
}

@Suite("VMM handoff (Firecracker protocol)", .serialized, .enabled(if: uffdSkipReason == nil, "userfaultfd unavailable (reason printed above)"))
struct HandoffTests {
    @Test(.timeLimit(.minutes(2)))
    func firecrackerStyleHandoffMigratesEveryByte() throws {
        let mem = try TempMemory(size: 8 << 20, zeroPercent: 20, seed: 21)
        let source = try startServer(mem)
        defer { source.stop() }
        let daemon = try startHandoff(port: source.port)
        defer { daemon.stop() }
        let vmm = try TestVMM(size: 8 << 20, splits: [3 << 20])
        let r = try migrateThroughDaemon(vmm, daemon, expected: Array(mem.mapping.bytes), threads: 4)
        #expect(r?.completed == true)
        #expect(r?.regions == 2)
        #expect((r?.faults ?? 0) > 0)
        #expect(source.stats.pagesSentTwice.load(ordering: .relaxed) == 0)
    }

    @Test(.timeLimit(.minutes(2)))
    func malformedClientsAreRefusedAndTheDaemonKeepsServing() throws {
        let mem = try TempMemory(size: 4 << 20, zeroPercent: 10, seed: 22)
        let source = try startServer(mem)
        defer { source.stop() }
        let daemon = try startHandoff(port: source.port)
        defer { daemon.stop() }
        let size = UInt64(4 << 20)
        func region(_ base: UInt64, _ size: UInt64, _ offset: UInt64, ps: UInt64 = 4096) -> String {
            "{\"base_host_virt_addr\":\(base),\"size\":\(size),\"offset\":\(offset),\"page_size\":\(ps),\"page_size_kib\":\(ps)}"
        }
        let base: UInt64 = 0x7000_0000_0000
        let cases: [(String, String?, Int, String)] = [
            ("malformed JSON", "[{\"base_host_virt_addr\": 1, ", 1, "malformed"),
            ("not an array", "{\"regions\": []}", 1, "malformed"),
            ("empty list", "[]", 1, "empty"),
            ("missing field", "[{\"base_host_virt_addr\":\(base),\"size\":\(size),\"page_size\":4096}]", 1, "offset"),
            ("negative size", "[{\"base_host_virt_addr\":\(base),\"size\":-4096,\"offset\":0,\"page_size\":4096}]", 1, "malformed"),
            ("no fd", nil, 0, "no userfaultfd"),
            ("an fd after the uffd, no file named", nil, 2, "no region names a memory file"),
            ("zero-size region", "[\(region(base, 0, 0)),\(region(base + size, size, 0))]", 1, "size 0"),
            ("page size 8 KiB", "[\(region(base, size, 0, ps: 8192))]", 1, "neither 4 KiB nor 2 MiB"),
            ("page size 1 GiB", "[\(region(base, size, 0, ps: 1 << 30))]", 1, "neither 4 KiB nor 2 MiB"),
            ("mixed page sizes", "[\(region(base, size / 2, 0)),\(region(base + size, size / 2, size / 2, ps: 2 << 20))]", 1, "one page size per VM"),
            ("misaligned base", "[\(region(base + 100, size, 0))]", 1, "aligned"),
            ("overlapping regions", "[\(region(base, size / 2, 0)),\(region(base + 4096, size / 2, size / 2))]", 1, "overlap"),
            ("beyond the source memory", "[\(region(base, size * 2, 0))]", 1, "beyond the source memory"),
            ("gap in the source memory", "[\(region(base, size / 2, 0)),\(region(base + size, size / 4, size * 3 / 4))]", 1, "no region covers"),
        ]
        var expectedRejections: UInt64 = 0
        for (name, json, fdCount, needle) in cases {
            let vmm = try TestVMM(size: 4 << 20)
            let extra = try EventFD()
            let fds: [Int32] = Array([vmm.uffd.fd.raw, extra.fd.raw].prefix(fdCount))
            try vmm.handOver(daemon.path, json: json.map { Array($0.utf8) }, fds: fds)
            expectedRejections += 1
            #expect(vmm.closedByDaemon(), "\(name): daemon kept the connection")
            #expect(waitFor(name) { daemon.stats.rejected.load(ordering: .relaxed) == expectedRejections })
            let why = daemon.stats.lastRejection.withLock { $0 } ?? ""
            #expect(why.contains(needle), "\(name): rejection was '\(why)'")
        }
        // An honest VMM after all that still migrates completely.
        let vmm = try TestVMM(size: 4 << 20)
        try vmm.handOver(daemon.path)
        vmm.touchAll(threads: 2)
        #expect(waitFor("completion") { daemon.stats.completed.load(ordering: .relaxed) == 1 })
        #expect(vmm.contents() == Array(mem.mapping.bytes))
    }

    /// MADV_DONTNEED by the VMM (balloon inflate): the range reads as zero from then
    /// on and is never filled from the source again; everything else arrives intact.
    @Test(.timeLimit(.minutes(2)))
    func removedPagesReadZeroAndAreNeverRefilled() throws {
        let size = 8 << 20
        let mem = try TempMemory(size: size, zeroPercent: 0, seed: 23)
        let source = try startServer(mem)
        defer { source.stop() }
        // Background slowed to 2 MiB/s so the remove lands mid-migration.
        let daemon = try startHandoff(port: source.port, rate: 2 << 20)
        defer { daemon.stop() }
        let vmm = try TestVMM(size: size)
        try vmm.handOver(daemon.path)
        let base = vmm.mappings[0].base
        // Touch the first 2 MiB (demand), then discard 1 MiB..3 MiB: half present, half missing.
        for off in stride(from: 0, to: 2 << 20, by: 4096) { _ = cpc_touch_read(base + off) }
        #expect(cpc_madvise_dontneed(base + (1 << 20), 2 << 20) == 0)
        vmm.touchAll(threads: 2)
        #expect(waitFor("completion") { daemon.stats.completed.load(ordering: .relaxed) == 1 })
        let got = vmm.contents()
        let want = Array(mem.mapping.bytes)
        let removed = (1 << 20)..<(3 << 20)
        #expect(got[removed].allSatisfy { $0 == 0 }, "a removed page was filled from the source")
        #expect(got[..<removed.lowerBound] == want[..<removed.lowerBound])
        #expect(got[removed.upperBound...] == want[removed.upperBound...])
        vmm.goAway()
        #expect(waitFor("session end") { daemon.stats.ended.load(ordering: .relaxed) == 1 })
        #expect((daemon.stats.reports.withLock { $0.first?.removeEvents } ?? 0) >= 1)
    }

    /// Pure precopy's VMM asks to be told when every page is in and touches
    /// nothing meanwhile (its vCPUs wait): the daemon's one line says so once
    /// the stream has brought every page, and guest memory is then complete.
    /// A VMM asking after completion is answered at once.
    @Test(.timeLimit(.minutes(2)))
    func aVMMThatAskedIsToldWhenEveryPageIsIn() throws {
        let size = 8 << 20
        let mem = try TempMemory(size: size, zeroPercent: 20, seed: 25)
        let source = try startServer(mem)
        defer { source.stop() }
        let daemon = try startHandoff(port: source.port, rate: 8 << 20)  // about a second of stream
        defer { daemon.stop() }
        for shared in [true, false] {
            let completed = daemon.stats.completed.load(ordering: .relaxed)
            let vmm = try TestVMM(size: size, shared: shared)
            try vmm.handOver(daemon.path)
            try vmm.client!.requestCompletionNotice()
            let asked = nowNanoseconds()
            let answer = try vmm.client!.waitForCompletion(timeoutMs: 60_000)
            #expect(answer == CompletionNotice.Answer(complete: true, pages: size / 4096), "shared \(shared): \(answer)")
            // Told as soon as every page is in; the daemon's own bookkeeping (and the
            // source's acknowledgement) follows.
            #expect(waitFor("completion") { daemon.stats.completed.load(ordering: .relaxed) == completed + 1 })
            #expect(nowNanoseconds() - asked > 100_000_000, "the throttled stream cannot be done at once")
            #expect(vmm.contents() == Array(mem.mapping.bytes), "shared \(shared): guest memory differs from the source")
            // One answer per session: asking again gets nothing more.
            try vmm.client!.requestCompletionNotice()
            #expect(throws: HandoffError.self, "one answer per session") { _ = try vmm.client!.waitForCompletion(timeoutMs: 300) }
            vmm.goAway()
        }
        let late = try TestVMM(size: size)
        try late.handOver(daemon.path)
        late.touchAll(threads: 2)
        #expect(waitFor("completion") { daemon.stats.completed.load(ordering: .relaxed) == 3 })
        try late.client!.requestCompletionNotice()
        #expect(try late.client!.waitForCompletion(timeoutMs: 5_000).complete)
        late.goAway()
    }

    @Test(.timeLimit(.minutes(2)))
    func aVMMGoingAwayReleasesOnlyItsSession() throws {
        let mem = try TempMemory(size: 8 << 20, zeroPercent: 0, seed: 24)
        let source = try startServer(mem)
        defer { source.stop() }
        let daemon = try startHandoff(port: source.port, rate: 1 << 20)
        defer { daemon.stop() }
        let first = try TestVMM(size: 8 << 20)
        try first.handOver(daemon.path)
        _ = cpc_touch_read(first.mappings[0].base)  // one page, then the VMM dies mid-migration
        first.goAway()
        #expect(waitFor("first session end") { daemon.stats.ended.load(ordering: .relaxed) == 1 })
        #expect(daemon.stats.reports.withLock { $0.first?.completed } == false)
        let second = try TestVMM(size: 8 << 20)
        try second.handOver(daemon.path)
        second.touchAll(threads: 2)
        #expect(waitFor("second completion") { daemon.stats.completed.load(ordering: .relaxed) == 1 })
        #expect(second.contents() == Array(mem.mapping.bytes))
    }
}

@Suite("handoff message")
struct HandoffMessageTests {
    /// The completion notice: the request is recognised exactly (an APF
    /// enable or anything else is not it), the answer is one line that
    /// round-trips, a long error is cut to fit, and a garbled line is refused.
    @Test func completionNoticeRoundTrips() throws {
        #expect(CompletionNotice.isRequest(CompletionNotice.request))
        #expect(!CompletionNotice.isRequest(APFEnable.json))
        #expect(!CompletionNotice.isRequest(Array(#"{"notify":{"complete":2}}"#.utf8)))
        #expect(!CompletionNotice.isRequest(Array("notify".utf8)))
        for a in [CompletionNotice.Answer(complete: true, pages: 262_144), .init(complete: false, error: String(repeating: "x", count: 5000))] {
            let line = CompletionNotice.encode(a)
            #expect(line.last == UInt8(ascii: "\n") && line.filter { $0 == UInt8(ascii: "\n") }.count == 1)
            #expect(line.count <= CompletionNotice.maxAnswerBytes)
            let back = try CompletionNotice.decode(Array(line.dropLast()))
            #expect(back.complete == a.complete && back.pages == a.pages)
            if a.error != nil { #expect(back.error?.hasSuffix("...") == true) }
        }
        #expect(throws: HandoffError.self) { _ = try CompletionNotice.decode(Array("done".utf8)) }
    }

    @Test func firecrackerMessageRoundTrips() throws {
        let regions = [VMMRegion(base: 0x7F00_0000_0000, size: 1 << 30, offset: 0, pageSize: 4096),
                       VMMRegion(base: 0x7E00_0000_0000, size: 1 << 20, offset: 1 << 30, pageSize: 4096)]
        #expect(try HandoffMessage.parse(HandoffMessage.encode(regions), hostPageSize: 4096) == regions)
    }

    @Test func deprecatedPageSizeKibHoldsBytes() throws {
        let json = Array("[{\"base_host_virt_addr\":4096,\"size\":8192,\"offset\":0,\"page_size_kib\":4096}]".utf8)
        #expect(try HandoffMessage.parse(json, hostPageSize: 4096).first?.pageSize == 4096)
    }

    @Test func disagreeingPageSizesAreRefused() {
        let json = Array("[{\"base_host_virt_addr\":4096,\"size\":8192,\"offset\":0,\"page_size\":4096,\"page_size_kib\":4}]".utf8)
        #expect(throws: HandoffError.self) { _ = try HandoffMessage.parse(json, hostPageSize: 4096) }
    }
}
