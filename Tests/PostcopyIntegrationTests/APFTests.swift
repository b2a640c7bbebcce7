import CPostcopy
import Foundation
import PostcopyCore
import PostcopyDestination
import PostcopyGuest
import PostcopyHandoff
import PostcopySource
import PostcopyTransport
import PostcopyWire
import Synchronization
import Testing

/// A VMM whose guest RAM raises SIGBUS on missing pages, with its APF channel enabled.
func apfVMM(_ daemon: HandoffServer, size: Int) throws -> (TestVMM, APFGuestChannel) {
    let vmm = try TestVMM(size: size, sigbus: true)
    try vmm.handOver(daemon.path)
    let ch = try APFGuestChannel()
    try #require(vmm.client).enableAPF(fds: ch.fds)
    return (vmm, ch)
}

@Suite("paravirtual async page faults", .serialized, .enabled(if: uffdSkipReason == nil, "userfaultfd unavailable (reason printed above)"))
struct APFTests {
    /// Demand only (no background stream): every page a task touches comes by an
    /// async fault; each "page not present" gets exactly one "page ready".
    @Test(.timeLimit(.minutes(2)))
    func everyNotPresentGetsExactlyOneReady() throws {
        let mem = try TempMemory(size: 8 << 20, zeroPercent: 10, seed: 61)
        let server = try startServer(mem)
        defer { server.stop() }
        let daemon = try startHandoff(port: server.port, background: false)
        defer { daemon.stop() }
        let (vmm, ch) = try apfVMM(daemon, size: 8 << 20)
        let m = vmm.mappings[0]
        let guest = TaskGuest(base: m.base, bytes: m.length, vcpus: 2, tasksPerVCPU: 8, think: 0, seed: 5, channel: ch)
        guest.start()
        #expect(waitFor("async faults") { guest.vcpuTotals.notPresent >= 200 })
        guest.stop()
        guest.touchAll()
        let v = guest.vcpuTotals
        print("APF: \(v.notPresent) not-present, \(v.ready) ready, \(v.notifications) notifications, \(guest.totalOps) reads")
        #expect(v.notPresent > 0 && v.ready == v.notPresent, "\(v.notPresent) not-present, \(v.ready) ready")
        #expect(v.blockingFallbacks == 0)
        #expect(vmm.contents() == Array(mem.mapping.bytes), "guest memory differs from the source")
        #expect(waitFor("completion") { daemon.stats.completed.load(ordering: .relaxed) == 1 })
    }

    /// Sixteen tasks on two vCPUs all touching the same four pages: one fetch
    /// per page, a "page ready" for every "page not present", no task left parked.
    @Test(.timeLimit(.minutes(2)))
    func concurrentFaultsOnOnePageLoseNoWakeUp() throws {
        let mem = try TempMemory(size: 4 << 20, zeroPercent: 0, seed: 63)
        let server = try startServer(mem)
        defer { server.stop() }
        let daemon = try startHandoff(port: server.port, background: false, prefetch: .off)  // the four pages only
        defer { daemon.stop() }
        let (vmm, ch) = try apfVMM(daemon, size: 4 << 20)
        let m = vmm.mappings[0]
        let guest = TaskGuest(base: m.base + (1 << 20), bytes: 4 * 4096, vcpus: 2, tasksPerVCPU: 8, think: 0, seed: 9, channel: ch)
        guest.start()
        #expect(waitFor("the four pages") { guest.totalOps > 10_000 })
        guest.stop()  // returns only when every task ran to its end
        let v = guest.vcpuTotals
        print("APF one page: \(v.notPresent) not-present, \(v.ready) ready, \(server.stats.demandPages.load(ordering: .relaxed)) pages fetched")
        #expect(v.notPresent >= 4 && v.ready == v.notPresent)
        #expect(server.stats.demandPages.load(ordering: .relaxed) == 4, "each page fetched once")
        #expect(server.stats.pagesSentTwice.load(ordering: .relaxed) == 0)
    }

    /// A guest that writes garbage into its rings loses APF; the daemon neither
    /// reads nor writes outside the channel, and keeps serving other VMMs.
    @Test(.timeLimit(.minutes(2)))
    func garbageRingsDisableAPFForThatGuestOnly() throws {
        let mem = try TempMemory(size: 4 << 20, zeroPercent: 10, seed: 64)
        let server = try startServer(mem)
        defer { server.stop() }
        let daemon = try startHandoff(port: server.port, background: false)
        defer { daemon.stop() }
        let (hostile, ch) = try apfVMM(daemon, size: 4 << 20)
        // A request for an address outside guest memory, then a producer index far past the ring.
        let raw = UnsafeMutableRawPointer(mutating: ch.mappingBase)
        let entry = raw + APF.headerSize
        entry.storeBytes(of: UInt64(77), as: UInt64.self)
        (entry + 8).storeBytes(of: UInt64(0x10), as: UInt64.self)
        (raw + 64).storeBytes(of: UInt32(1), as: UInt32.self)
        var one: UInt64 = 1
        _ = write(ch.requestFD.raw, &one, 8)
        #expect(waitFor("the invalid-address completion") { (raw + 192).load(as: UInt32.self) == 1 })
        #expect((raw + APF.headerSize + 256 * 32).load(as: UInt64.self) == 77, "token 77 answered")
        #expect((raw + APF.headerSize + 256 * 32 + 8).load(as: UInt32.self) == 1, "as not guest memory")
        (raw + 64).storeBytes(of: UInt32(1_000_000), as: UInt32.self)
        _ = write(ch.requestFD.raw, &one, 8)
        usleep(100_000)
        hostile.goAway()
        // An honest VMM (blocking faults) on the same daemon migrates every byte.
        let honest = try TestVMM(size: 4 << 20)
        _ = try migrateThroughDaemon(honest, daemon, expected: Array(mem.mapping.bytes))
    }

    /// A guest that goes away mid-migration with tasks parked: its session ends,
    /// the daemon serves the next VMM.
    @Test(.timeLimit(.minutes(2)))
    func aGuestDyingMidMigrationLeavesTheDaemonServing() throws {
        let mem = try TempMemory(size: 8 << 20, zeroPercent: 10, seed: 65)
        let server = try startServer(mem)
        defer { server.stop() }
        let daemon = try startHandoff(port: server.port, rate: 1 << 20)
        defer { daemon.stop() }
        let ended = daemon.stats.ended.load(ordering: .relaxed)
        do {
            let (vmm, ch) = try apfVMM(daemon, size: 8 << 20)
            let m = vmm.mappings[0]
            let guest = TaskGuest(base: m.base, bytes: m.length, vcpus: 1, tasksPerVCPU: 4, think: 0, seed: 3, channel: ch)
            guest.start()
            #expect(waitFor("async faults") { guest.vcpuTotals.notPresent > 20 })
            vmm.goAway()  // the VMM dies; its tasks would stay parked forever
            #expect(waitFor("session end") { daemon.stats.ended.load(ordering: .relaxed) == ended + 1 })
            // (The dead guest's vCPU thread is left behind in this test process, parked.)
            _ = Unmanaged.passRetained(guest)
        }
        let next = try TestVMM(size: 8 << 20)
        _ = try migrateThroughDaemon(next, daemon, expected: Array(mem.mapping.bytes))
    }
}
