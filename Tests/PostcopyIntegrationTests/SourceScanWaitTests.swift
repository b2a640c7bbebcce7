import PostcopyCore
import PostcopySource
import PostcopyTransport
import PostcopyWire
import Testing

/// The source's RAM scan reads all of RAM: it runs when somebody needs it,
/// not because a destination said it is complete.
@Suite("when the source scans")
struct SourceScanWaitTests {
    /// A `complete` without a digest (a handoff daemon's: its VMM checks
    /// integrity) is acknowledged at once and does not start the scan; one
    /// with a digest waits for it and compares (fails on a source that scans
    /// for every completion: the digests would be there after the first ack).
    @Test(.timeLimit(.minutes(1)))
    func aCompletionWithoutADigestLeavesTheScanAlone() throws {
        let size = 16 << 20
        let ram = try MemoryMapping.anonymous(length: size)
        for p in stride(from: 0, to: size, by: 4096) { (ram.base + p).storeBytes(of: UInt8(truncatingIfNeeded: p >> 12 | 1), as: UInt8.self) }
        let memory = try SourceMemory(mapping: ram, pageSize: 4096)
        let server = try PageServer(memory: memory, listen: Endpoint(host: "127.0.0.1", port: 0), exitAfterCompletion: false, logger: testLogger("test.scan"))
        server.start()
        defer { server.stop() }
        memory.freeze(deviceState: [1, 2, 3])
        let c = try rawConnect(server.port)
        defer { c.close() }
        _ = try HostileDestinationTests.hello(c)
        try c.send(Message.complete(Complete(pagesReceived: UInt64(size / 4096), digest: nil)))
        guard case .completeAck(let ack) = try c.receive(timeoutMs: 10_000) else { Issue.record("no completeAck"); return }
        #expect(!ack.digestMatches, "no digest was sent: nothing matches")
        // No page was served for 500 ms would start it (`idleBeforeDigestsMs`); look well before.
        let scanned = memory.scanIfDone != nil
        #expect(!scanned, "the scan ran for a completion that carried no digest")
        // A destination that sends its digest gets the comparison (the scan runs for it).
        let c2 = try rawConnect(server.port)
        defer { c2.close() }
        _ = try HostileDestinationTests.hello(c2)
        try c2.send(Message.complete(Complete(pagesReceived: UInt64(size / 4096), digest: 42)))
        guard case .completeAck(let ack2) = try c2.receive(timeoutMs: 30_000) else { Issue.record("no completeAck"); return }
        #expect(!ack2.digestMatches)
        let scannedNow = memory.scanIfDone != nil
        #expect(scannedNow, "a completion with a digest waits for the scan")
    }
}
