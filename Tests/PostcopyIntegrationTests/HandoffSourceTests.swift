import CPostcopy
import Foundation
import PostcopyCore
import PostcopyHandoff
import PostcopySource
import PostcopyTransport
import Testing

/// One daemon serving VMMs that migrate from different sources: each names its
/// own in the handoff (`postcopy_source`), the daemon's `--connect` is only the
/// default.
@Suite("VMMs naming their own source", .serialized, .enabled(if: uffdSkipReason == nil, "userfaultfd unavailable (reason printed above)"))
struct HandoffSourceTests {
    @Test func theSourceFieldRoundTripsAndIsChecked() throws {
        let r = [VMMRegion(base: 1 << 30, size: 1 << 20, offset: 0, pageSize: 4096, source: "10.0.0.7:7000"),
                 VMMRegion(base: 2 << 30, size: 1 << 20, offset: 1 << 20, pageSize: 4096, source: "10.0.0.7:7000")]
        #expect(try HandoffMessage.parse(HandoffMessage.encode(r), hostPageSize: 4096) == r)
        var other = r
        other[1].source = "10.0.0.8:7000"
        #expect(throws: HandoffError.self) { try HandoffMessage.parse(HandoffMessage.encode(other), hostPageSize: 4096) }
        var half = r
        half[1].source = nil
        #expect(throws: HandoffError.self) { try HandoffMessage.parse(HandoffMessage.encode(half), hostPageSize: 4096) }
        for bad in ["", "nonsense", "host:", ":7000", "host:0", "host:65536", "host:70x", String(repeating: "h", count: 400) + ":1"] {
            var one = [r[0]]
            one[0].source = bad
            #expect(throws: HandoffError.self, "\(bad.prefix(20))") { try HandoffMessage.parse(HandoffMessage.encode(one), hostPageSize: 4096) }
        }
    }

    /// Two VMMs of two sources through one daemon whose own source is a port
    /// nobody listens on: each migrates byte-exact from the source it named.
    @Test(.timeLimit(.minutes(2)))
    func twoVMMsFromTwoSourcesThroughOneDaemon() throws {
        let memA = try TempMemory(size: 8 << 20, zeroPercent: 10, seed: 61), memB = try TempMemory(size: 8 << 20, zeroPercent: 10, seed: 62)
        let a = try startServer(memA), b = try startServer(memB)
        defer { a.stop(); b.stop() }
        let nowhere = try TCPListener(Endpoint(host: "127.0.0.1", port: 0))
        let deadPort = nowhere.port
        nowhere.fd.close()
        let daemon = try startHandoff(port: deadPort)
        defer { daemon.stop() }
        for (i, (server, mem)) in [(a, memA), (b, memB)].enumerated() {
            let vmm = try TestVMM(size: 8 << 20)
            var regions = vmm.regions
            for j in regions.indices { regions[j].source = "127.0.0.1:\(server.port)" }
            try vmm.handOver(daemon.path, json: HandoffMessage.encode(regions))
            vmm.touchAll(threads: 2)
            #expect(waitFor("completion \(i)") { daemon.stats.completed.load(ordering: .relaxed) == UInt64(i + 1) })
            #expect(vmm.contents() == Array(mem.mapping.bytes), "VMM \(i) differs from its source")
            vmm.goAway()
            #expect(waitFor("session end \(i)") { daemon.stats.ended.load(ordering: .relaxed) == UInt64(i + 1) })
        }
        #expect(a.stats.completedSessions.load(ordering: .relaxed) == 1 && b.stats.completedSessions.load(ordering: .relaxed) == 1)
    }
}
