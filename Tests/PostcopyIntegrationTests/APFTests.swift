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
    let fds = ch.fds
    let n = APFEnable.json.withUnsafeBytes { b in fds.withUnsafeBufferPointer { cpc_send_with_fds(vmm.socket!.raw, b.baseAddress, b.count, $0.baseAddress, 3) } }
    #expect(n == APFEnable.json.count)
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
}

@Suite("APF debug", .serialized, .enabled(if: ProcessInfo.processInfo.environment["APF_DEBUG"] != nil))
struct APFDebug {
    @Test func withBackground() throws {
        let size = 256 << 20
        let mem = try TempMemory(size: size, zeroPercent: 10, seed: 62)
        let server = try startServer(mem)
        defer { server.stop() }
        let daemon = try startHandoff(port: server.port, background: ProcessInfo.processInfo.environment["APF_BG"] != nil)
        defer { daemon.stop() }
        let (vmm, ch) = try apfVMM(daemon, size: size)
        let m = vmm.mappings[0]
        let tpv = Int(ProcessInfo.processInfo.environment["APF_TASKS"] ?? "8")!
        let guest = TaskGuest(base: m.base, bytes: m.length, vcpus: 2, tasksPerVCPU: tpv, think: 100, seed: 5, channel: ch)
        guest.start()
        for _ in 0..<10 {
            usleep(100_000)
            let v = guest.vcpuTotals
            print("t: ops \(guest.totalOps) np \(v.notPresent) ready \(v.ready) settled \(daemon.stats.completed.load(ordering: .relaxed)) stalls \(guest.perTask.map { $0.stallNs / 1_000_000 })")
        }
        guest.stop()
        print("stalls after stop: \(guest.perTask.map { $0.stallNs / 1_000_000 })")
    }
}
