import CPostcopy
import Foundation
import PostcopyCore
@_spi(Testing) import PostcopyDestination
import PostcopySource
import PostcopyTesting
import PostcopyTransport
import PostcopyWire
import Synchronization
import Testing

/// Replies cut mid-page (single replies and gathers): no page reaches the
/// guest before it is whole.
extension RecoveryTests {
    /// The connection is cut in the middle of a multi-page reply (the page at
    /// the cut half received; with CONTINUE, half written into the alias): no
    /// page of it may reach the guest before it is whole. Guest threads read
    /// every page during the migration and compare each one, as they read it,
    /// with the source's; the cut reply is re-requested after the reconnect.
    @Test(.timeLimit(.minutes(2)), arguments: InstallMode.allCases)
    func aCutMidReplyNeverMapsATornPage(install: InstallMode) throws {
        if skipped(install) { return }
        let t = try tornRun(install: install, seed: 47, fault: ResponseFault(.truncate, every: 5, delayMs: 30, limit: 3))
        let r = t.report
        print("torn (\(install)): \(t.affected) replies cut mid-page, \(r.recoveryNs.count) reconnect(s), \(t.checked) pages read by the guest, \(t.torn.count) differed, \(r.pagesReceivedInPlace) received in place")
        #expect(t.checked == 4096, "every page read once by the guest")
        if install == .continue {
            // Each non-zero page mapped here once, or left to the guest's own faults with its block.
            #expect(r.pagesCopied == 0 && r.pagesContinued + r.streamedPagesReleased == UInt64(r.nonZeroPages))
            #expect(r.pagesReceivedInPlace >= UInt64(r.nonZeroPages), "payloads land in the alias (the cut ones twice)")
        }
    }

    /// The same with gathers: a working set of every page in shuffled order is
    /// replayed in gathers of scattered runs, and replies to them are cut
    /// mid-page; the runs in flight are asked for again one by one after the
    /// reconnect, and no partial page is ever mapped.
    @Test(.timeLimit(.minutes(2)), arguments: InstallMode.allCases)
    func aCutMidGatherNeverMapsATornPage(install: InstallMode) throws {
        if skipped(install) { return }
        // 64 MiB: the replay (2048 pages in flight) outlasts three connections.
        let pages = 16384
        var rng = SplitMix64(seed: 9)
        let order = Array(0..<pages).shuffled(using: &rng)
        let t = try tornRun(install: install, seed: 53, fault: ResponseFault(.truncate, every: 2, delayMs: 30, limit: 3, gathersOnly: true),
                            size: pages * 4096) { mem in
            WorkingSet(pageSize: 4096, regionPages: [UInt64(pages)], recordedMs: 1000,
                       entries: order.map { WorkingSet.Entry(page: UInt64($0), digest: cpc_xxh64(mem.mapping.base + $0 * 4096, 4096, 0)) })
        }
        let r = t.report
        print("torn gathers (\(install)): \(t.affected) gather replies cut mid-page, \(r.recoveryNs.count) reconnect(s), \(t.gathers) gathers served, \(t.torn.count) pages differed")
        #expect(t.gathers > 3)
        #expect(r.demandPages + r.prefetchPages + r.backgroundPages == UInt64(r.nonZeroPages), "every page installed once")
    }

    /// A migration (16 MiB) through a proxy that mistreats replies with `fault`,
    /// the guest reading every page in order and checking each as it reads it;
    /// checks what every such run must hold (the fault really hit three
    /// replies, a reconnect, no page read torn, every byte and the digest).
    func tornRun(install: InstallMode, seed: UInt64, fault: ResponseFault, size: Int = 16 << 20,
                 workingSet: ((TempMemory) -> WorkingSet)? = nil) throws -> (report: DestinationReport, torn: [Int], checked: Int, affected: Int, gathers: UInt64) {
        let mem = try TempMemory(size: size, zeroPercent: 0, seed: seed)
        let server = try startServer(mem)
        defer { server.stop() }
        let proxy = try ChaosProxy(target: Endpoint(host: "127.0.0.1", port: server.port), fault: fault)
        defer { proxy.stop() }
        let cmp = ByteComparison(expected: mem.mapping.bytes)
        let torn = Locked<[Int]>([])
        let checked = Atomic<Int>(0)
        var options = DestinationOptions()
        options.install = install
        options.touch = .sequential
        options.threads = 2
        options.thinkMicroseconds = 20
        options.engine.recoveryDeadline = 10
        options.engine.replayWorkingSet = workingSet?(mem)
        options.onTouch = { offset, page in
            checked.add(1, ordering: .relaxed)
            if cmp.differs(at: offset, page) { torn.withLock { $0.append(offset / page.count) } }
        }
        options.inspect = { cmp.check($0) }
        let dest = StandaloneDestination(options: options, logger: testLogger("test.torn"))
        let r = try dest.run(transport: TCPTransport(endpoint: Endpoint(host: "127.0.0.1", port: proxy.port), maxBatchPages: 128),
                             transportReason: "test")
        let bad = torn.withLock { $0 }
        #expect(proxy.affected == 3, "the proxy must really have cut replies mid-page")
        #expect(r.recoveryNs.count >= 1)
        #expect(bad.isEmpty, "the guest read pages that differ from the source's: \(bad.prefix(8))")
        #expect(cmp.firstDifference == nil)
        #expect(r.digestMatch && r.sourceConfirmedDigest)
        return (r, bad, checked.load(ordering: .relaxed), proxy.affected, server.stats.gathers.load(ordering: .relaxed))
    }
}
