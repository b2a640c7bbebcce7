import Foundation
import PostcopyCore
import PostcopyDestination
import PostcopyHandoff
import PostcopyTesting
import PostcopyTransport
import Testing

/// The daemon's set-up of a VMM's session survives a lost connection the way a
/// running session does: a cut during the handshake, and another while the
/// page channels open, are reconnected, and the VMM is served, not refused.
@Suite("VMM handoff: connections lost during set-up", .serialized, .enabled(if: uffdSkipReason == nil, "userfaultfd unavailable (reason printed above)"))
struct HandoffRecoveryTests {
    @Test(.timeLimit(.minutes(2)))
    func cutsDuringSetUpAreRecoveredNotRefused() throws {
        let mem = try TempMemory(size: 8 << 20, zeroPercent: 20, seed: 71)
        let source = try startServer(mem)
        defer { source.stop() }
        // The first connection (main, in its handshake) and the third (the
        // urgent channel's, once the main one is back) end at once.
        let proxy = try ChaosProxy(target: Endpoint(host: "127.0.0.1", port: source.port), dropOnAccept: [1, 3])
        defer { proxy.stop() }
        let rejected = Locked<[String]>([])
        let daemon = try startHandoff(port: proxy.port, onRejected: { _, why in rejected.withLock { $0.append(why) } })
        defer { daemon.stop() }
        let vmm = try TestVMM(size: 8 << 20, splits: [])
        try vmm.handOver(daemon.path)
        #expect(waitFor("the channels") { proxy.connectionCount >= 4 || !rejected.withLock { $0 }.isEmpty })
        usleep(100_000)
        let refused = rejected.withLock { $0 }
        guard refused.isEmpty else {
            // (Not touching its memory: nobody would serve the faults.)
            Issue.record("the VMM was refused: \(refused)")
            return
        }
        vmm.touchAll(threads: 2)
        #expect(waitFor("completion") { daemon.stats.completed.load(ordering: .relaxed) == 1 })
        #expect(vmm.contents() == Array(mem.mapping.bytes), "guest memory differs from the source")
        vmm.goAway()
        #expect(waitFor("session end") { daemon.stats.ended.load(ordering: .relaxed) == 1 })
        #expect(daemon.stats.reports.withLock { $0.last }?.completed == true)
    }
}
