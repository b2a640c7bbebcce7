import CPostcopy
import Foundation
import PostcopyCore
import PostcopyDestination
import PostcopyHandoff
import PostcopySource
import PostcopyTransport
import Testing

/// Working-set record and replay through the real daemon (VMM handoff, shared
/// memory, real userfaultfd, loopback TCP).
@Suite("working-set record and replay", .serialized, .enabled(if: uffdSkipReason == nil, "userfaultfd unavailable (reason printed above)"))
struct WorkingSetTests {
    static let size = 8 << 20

    func daemon(_ port: Int, record: Double = 0, out: String? = nil, replay: WorkingSet? = nil) throws -> HandoffServer {
        var config = EngineConfig()
        config.installPath = .copy  // the VMM's memory decides (shared: continue)
        config.recordWorkingSetSeconds = record
        config.replayWorkingSet = replay
        config.prefetch = .off  // the recorded order is the touch order
        let server = try HandoffServer(path: socketPath(), source: Endpoint(host: "127.0.0.1", port: port), engineConfig: config,
                                       logger: testLogger("test.ws"), workingSetOut: out)
        server.start()
        return server
    }

    /// Hands the VMM over, reads `first` pages in that order from one thread,
    /// then every page; waits for completion; checks every byte.
    func migrate(_ vmm: TestVMM, _ d: HandoffServer, first: [Int], expected: [UInt8]) throws -> HandoffSessionReport? {
        try vmm.handOver(d.path)
        let base = vmm.mappings[0].address
        for p in first { _ = cpc_touch_read(UnsafeRawPointer(bitPattern: UInt(base) + UInt(p * 4096))!) }
        return try finish(vmm, d, expected: expected)
    }

    @Test(.timeLimit(.minutes(3)))
    func recordedOnceReplayedOnTheSameMemoryRefusedOnAnother() throws {
        let mem = try TempMemory(size: Self.size, zeroPercent: 0, seed: 31)
        let server = try startServer(mem)
        defer { server.stop() }
        let file = "/tmp/postcopy-ws-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        defer { unlink(file) }
        var rng = SplitMix64(seed: 5)
        let touched = Array((0..<(Self.size / 4096)).shuffled(using: &rng).prefix(300))

        // 1. Record: the pages read first, in their order, each with its digest.
        // A long window: a sanitizer build is slow, and the pages read first must fall in it.
        let rec = try daemon(server.port, record: 5, out: file)
        let r1 = try migrate(try TestVMM(size: Self.size, shared: true), rec, first: touched, expected: Array(mem.mapping.bytes))
        rec.stop()
        // The pages read first, in their order; then those of the rest read within the window.
        #expect((r1?.workingSetRecordedPages ?? 0) >= touched.count)
        let ws = try WorkingSet.load(from: file)
        #expect(ws.entries.count == r1?.workingSetRecordedPages)
        #expect(ws.entries.prefix(touched.count).map { Int($0.page) } == touched, "recorded in fault order")
        for e in ws.entries.prefix(20) {
            let p = Int(e.page)
            #expect(e.digest == cpc_xxh64(mem.mapping.base + p * 4096, 4096, 0))
        }

        // 2. Replay on the same memory: fetched ahead, no demand needed for them.
        let rep = try daemon(server.port, replay: ws)
        let vmm2 = try TestVMM(size: Self.size, shared: true)
        try vmm2.handOver(rep.path)
        usleep(300_000)  // the replay goes first, with no fault to wait for
        let r2 = try finish(vmm2, rep, expected: Array(mem.mapping.bytes))
        rep.stop()
        #expect(r2?.workingSetRefused == nil)
        #expect((r2?.replayPages ?? 0) > 0, "replayed \(r2?.replayPages ?? 0) pages")
        #expect(server.stats.gathers.load(ordering: .relaxed) > 0, "the replay's scattered pages came in gathers")

        // 3. The same file against other memory of the same size: refused by
        // the digests of the first pages it brings; the migration goes on.
        let other = try TempMemory(size: Self.size, zeroPercent: 0, seed: 32)
        let server2 = try startServer(other)
        defer { server2.stop() }
        let foreign = try daemon(server2.port, replay: ws)
        let r3 = try migrate(try TestVMM(size: Self.size, shared: true), foreign, first: [], expected: Array(other.mapping.bytes))
        foreign.stop()
        #expect(r3?.workingSetRefused?.contains("differ from their recorded digests") == true, "\(r3?.workingSetRefused ?? "not refused")")
        #expect((r3?.replayPages ?? 0) < UInt64(WorkingSetReplayLimit.checkBound), "kept replaying after the refusal")

        // 4. Other layout: refused before any page moves.
        let small = try TempMemory(size: Self.size / 2, zeroPercent: 0, seed: 33)
        let server3 = try startServer(small)
        defer { server3.stop() }
        let wrong = try daemon(server3.port, replay: ws)
        let r4 = try migrate(try TestVMM(size: Self.size / 2, shared: true), wrong, first: [], expected: Array(small.mapping.bytes))
        wrong.stop()
        #expect(r4?.workingSetRefused?.contains("does not fit") == true, "\(r4?.workingSetRefused ?? "not refused")")
        #expect(r4?.replayPages == 0)
    }

    /// The VMM says its recorded work is done (`RecordEnd`) long before the
    /// window's 60 s: the window ends then. The stream, held off while
    /// recording, brings the rest with no further touch (on the old daemon
    /// nothing would come for 60 s), and the record holds exactly the pages
    /// the work read, in its order. A daemon that records nothing ignores it.
    @Test(.timeLimit(.minutes(2)))
    func theVMMEndsTheRecordingWhenItsWorkIsDone() throws {
        let mem = try TempMemory(size: Self.size, zeroPercent: 0, seed: 34)
        let server = try startServer(mem)
        defer { server.stop() }
        let file = "/tmp/postcopy-ws-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        defer { unlink(file) }
        var rng = SplitMix64(seed: 9)
        let work = Array((0..<(Self.size / 4096)).shuffled(using: &rng).prefix(200))
        for recording in [true, false] {
            let d = try daemon(server.port, record: recording ? 60 : 0, out: recording ? file : nil)
            defer { d.stop() }
            let vmm = try TestVMM(size: Self.size, shared: true)
            try vmm.handOver(d.path)
            let base = vmm.mappings[0].address
            for p in work { _ = cpc_touch_read(UnsafeRawPointer(bitPattern: UInt(base) + UInt(p * 4096))!) }
            try vmm.client!.endRecording()
            // No other touch: only the stream can complete the migration now.
            #expect(waitFor("completion without a touch") { d.stats.completed.load(ordering: .relaxed) == 1 })
            #expect(vmm.contents() == Array(mem.mapping.bytes), "guest memory differs from the source")
            vmm.goAway()
            #expect(waitFor("session end") { d.stats.ended.load(ordering: .relaxed) == 1 })
            let r = d.stats.reports.withLock { $0.last }
            if recording {
                #expect(r?.workingSetRecordedPages == work.count)
                let ws = try WorkingSet.load(from: file)
                let exact = ws.entries.map { Int($0.page) } == work
                #expect(exact, "the record is the work's pages, in their order (\(ws.entries.count) recorded)")
                #expect(ws.recordedMs < 60_000, "the window ended with the work (\(ws.recordedMs) ms)")
            } else {
                #expect(r?.completed == true)
            }
        }
    }

    func finish(_ vmm: TestVMM, _ d: HandoffServer, expected: [UInt8]) throws -> HandoffSessionReport? {
        vmm.touchAll(threads: 2)
        #expect(waitFor("completion") { d.stats.completed.load(ordering: .relaxed) == 1 })
        #expect(vmm.contents() == expected, "guest memory differs from the source")
        vmm.goAway()
        #expect(waitFor("session end") { d.stats.ended.load(ordering: .relaxed) == 1 })
        return d.stats.reports.withLock { $0.last }
    }
}

/// A refused replay stops at once: at most the requests already out (a window) were replayed.
enum WorkingSetReplayLimit { static let checkBound = 4 * 32 * 128 }
