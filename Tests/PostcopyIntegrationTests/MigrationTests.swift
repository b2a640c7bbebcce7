import CPostcopy
import Foundation
import PostcopyCore
import PostcopyDestination
import PostcopySource
import PostcopyTransport
import PostcopyWire
import Testing

/// End-to-end migrations with the real kernel userfaultfd over loopback TCP.
@Suite("migration over loopback TCP", .serialized, .enabled(if: uffdSkipReason == nil, "userfaultfd unavailable (reason printed above)"))
struct MigrationTests {
    @Test(.timeLimit(.minutes(3)), arguments: InstallMode.allCases)
    func randomTouchesFromFourThreadsEveryByteEqual(install: InstallMode) throws {
        if skipped(install) { return }
        let mem = try TempMemory(size: 32 << 20, zeroPercent: 20)
        let server = try startServer(mem, deviceState: Array("vcpu-state".utf8))
        defer { server.stop() }
        let cmp = ByteComparison(expected: mem.mapping.bytes)
        let r = try runDestination(port: server.port, touch: .random, threads: 4, install: install, compare: cmp)
        #expect(cmp.firstDifference == nil, "first differing byte at \(String(describing: cmp.firstDifference))")
        #expect(r.digestMatch && r.sourceConfirmedDigest)
        #expect(r.faults > 0, "the guest threads must really fault")
        #expect(r.demandPages + r.prefetchPages + r.backgroundPages == UInt64(r.nonZeroPages))
        #expect(r.pagesSentTwice == 0)
        #expect(r.installPath == install.rawValue)
        #expect(r.deviceStateBytes == 10)
        #expect(r.faultLatency.count > 0 && r.faultLatency.p50Ns > 0)
        #expect(r.wireOverhead < 1.02, "wire overhead \(r.wireOverhead)")
        #expect(server.stats.pagesSentTwice.load(ordering: .relaxed) == 0)
    }

    @Test(.timeLimit(.minutes(3)), arguments: InstallMode.allCases)
    func demandOnlyEveryPageFaultedIn(install: InstallMode) throws {
        if skipped(install) { return }
        let mem = try TempMemory(size: 8 << 20, zeroPercent: 30, seed: 99)
        let server = try startServer(mem)
        defer { server.stop() }
        let cmp = ByteComparison(expected: mem.mapping.bytes)
        let r = try runDestination(port: server.port, touch: .sequential, threads: 2, background: false, install: install, prefetch: .off, compare: cmp)
        #expect(cmp.firstDifference == nil)
        #expect(r.digestMatch)
        #expect(r.backgroundPages == 0)
        #expect(r.demandPages == UInt64(r.nonZeroPages), "every non-zero page came by demand")
        #expect(r.zeroPagesFaulted == UInt64(r.zeroPages), "every zero page was filled (UFFDIO_ZEROPAGE, or CONTINUE alone)")
        #expect(r.guestTouchLatency.count == UInt64(r.totalPages))
    }

    /// The zero map's pages are mapped while the stream runs, so a guest that
    /// touches them later takes no fault, and reads zeros.
    @Test(.timeLimit(.minutes(3)), arguments: InstallMode.allCases)
    func zeroPagesAreMappedBeforeTheGuestTouchesThem(install: InstallMode) throws {
        if skipped(install) { return }
        let mem = try TempMemory(size: 8 << 20, zeroPercent: 40, seed: 21)
        let server = try startServer(mem)
        defer { server.stop() }
        let cmp = ByteComparison(expected: mem.mapping.bytes)
        let r = try runDestination(port: server.port, touch: .none, threads: 1, install: install, compare: cmp)
        #expect(cmp.firstDifference == nil)
        #expect(r.digestMatch && r.sourceConfirmedDigest)
        #expect(r.zeroPages > 0)
        #expect(r.zeroPagesMappedAhead == UInt64(r.zeroPages), "\(r.zeroPagesMappedAhead) of \(r.zeroPages) zero pages mapped ahead")
        #expect(r.zeroPagesFaulted == 0)
        #expect(r.backgroundPages == UInt64(r.nonZeroPages))
    }

    @Test(.timeLimit(.minutes(3)), arguments: InstallMode.allCases)
    func concurrentFaultsOnOnePageFetchItOnce(install: InstallMode) throws {
        if skipped(install) { return }
        let mem = try TempMemory(size: 4 << 20, zeroPercent: 10, seed: 5)
        let server = try startServer(mem)
        defer { server.stop() }
        let cmp = ByteComparison(expected: mem.mapping.bytes)
        // Demand only, 4 threads touching the same pages in the same order.
        let r = try runDestination(port: server.port, touch: .shared, threads: 4, background: false, install: install, prefetch: .off, compare: cmp)
        #expect(cmp.firstDifference == nil)
        #expect(r.digestMatch)
        #expect(r.pagesSentTwice == 0, "a page was fetched twice")
        #expect(r.demandPages == UInt64(r.nonZeroPages))
        #expect(r.faults >= UInt64(r.totalPages))
        #expect(r.touchedPages == 4 * r.totalPages)
    }

    @Test(.timeLimit(.minutes(3)), arguments: InstallMode.allCases)
    func backgroundOnlyNoGuestTouches(install: InstallMode) throws {
        if skipped(install) { return }
        let mem = try TempMemory(size: 16 << 20, zeroPercent: 0, seed: 3)
        let server = try startServer(mem)
        defer { server.stop() }
        let cmp = ByteComparison(expected: mem.mapping.bytes)
        let r = try runDestination(port: server.port, touch: .none, threads: 1, install: install, compare: cmp)
        #expect(cmp.firstDifference == nil)
        #expect(r.faults == 0 && r.demandPages == 0)
        #expect(r.backgroundPages == UInt64(r.totalPages))
    }

    @Test(.timeLimit(.minutes(3)), arguments: InstallMode.allCases)
    func allZeroMemoryTransfersNoPages(install: InstallMode) throws {
        if skipped(install) { return }
        let mem = try TempMemory(size: 4 << 20, zeroPercent: 100)
        let server = try startServer(mem)
        defer { server.stop() }
        let cmp = ByteComparison(expected: mem.mapping.bytes)
        let r = try runDestination(port: server.port, touch: .random, threads: 2, install: install, compare: cmp)
        #expect(cmp.firstDifference == nil)
        #expect(r.zeroPages == r.totalPages)
        #expect(r.demandPages == 0 && r.backgroundPages == 0)
    }

    /// Guest threads still faulting when the last page lands must all be woken
    /// (zero pages are settled without being installed, so late faults on them
    /// race with the unregister). Many short runs make the race likely.
    @Test(.timeLimit(.minutes(3)), arguments: InstallMode.allCases)
    func lateFaultsAfterCompletionNeverPark(install: InstallMode) throws {
        if skipped(install) { return }
        let mem = try TempMemory(size: 2 << 20, zeroPercent: 50, seed: 11)
        let server = try startServer(mem)
        defer { server.stop() }
        for _ in 0..<40 {
            let r = try runDestination(port: server.port, touch: .random, threads: 4, install: install)
            #expect(r.digestMatch)
            #expect(r.touchedPages == r.totalPages)
        }
    }

    @Test(.timeLimit(.minutes(3)))
    func oneSourceServesConsecutiveSessions() throws {
        let mem = try TempMemory(size: 4 << 20)
        let server = try startServer(mem)
        defer { server.stop() }
        for _ in 0..<3 {
            let r = try runDestination(port: server.port, touch: .random, threads: 2)
            #expect(r.digestMatch && r.pagesSentTwice == 0)
        }
        #expect(server.stats.completedSessions.load(ordering: .relaxed) == 3)
    }
}

/// Adaptive prefetch with the real kernel userfaultfd over loopback TCP: two
/// threads each reading their half in order, no background stream, so every
/// page comes by demand or by prefetch.
@Suite("prefetch over loopback TCP", .serialized, .enabled(if: uffdSkipReason == nil, "userfaultfd unavailable (reason printed above)"))
struct PrefetchMigrationTests {
    @Test(.timeLimit(.minutes(3)), arguments: InstallMode.allCases)
    func sequentialReadersArePrefetchedAheadAndNoPageComesTwice(install: InstallMode) throws {
        if skipped(install) { return }
        let mem = try TempMemory(size: 16 << 20, zeroPercent: 10, seed: 77)
        let server = try startServer(mem)
        defer { server.stop() }
        let cmp = ByteComparison(expected: mem.mapping.bytes)
        let r = try runDestination(port: server.port, touch: .sequential, threads: 2, background: false, install: install,
                                   prefetch: .adaptive, compare: cmp)
        print("prefetch (\(install)): \(r.faults) faults, \(r.demandPages) demand, \(r.prefetchPages) prefetch (\(r.prefetchHits) shown used) of \(r.nonZeroPages) non-zero pages")
        #expect(cmp.firstDifference == nil, "first differing byte at \(String(describing: cmp.firstDifference))")
        #expect(r.digestMatch && r.sourceConfirmedDigest)
        #expect(r.demandPages + r.prefetchPages == UInt64(r.nonZeroPages), "every page came once, by demand or prefetch")
        #expect(r.pagesSentTwice == 0 && server.stats.pagesSentTwice.load(ordering: .relaxed) == 0)
        #expect(r.demandPages * 10 < UInt64(r.nonZeroPages), "\(r.demandPages) demand faults for \(r.nonZeroPages) pages read in order")
        #expect(r.prefetchHits > r.prefetchPages / 2, "\(r.prefetchHits) of \(r.prefetchPages) prefetched pages shown used")
        #expect(server.stats.prefetchPages.load(ordering: .relaxed) == r.prefetchPages)
        #expect(r.prefetchPagesOnDemandChannel > 0, "with no stream, the prefetch goes on the demand channel")
    }

    /// With a background stream (slowed, so that readers overtake it), the
    /// prefetch leaves on the stream's connection, not on the demand channel
    /// (but for the first faults, before the stream started), and its replies
    /// are installed by the background thread. On the copy path it stays on
    /// the demand channel (a background UFFDIO_COPY races with REMOVE).
    @Test(.timeLimit(.minutes(3)), arguments: InstallMode.allCases)
    func withAStreamThePrefetchRidesTheBackgroundConnection(install: InstallMode) throws {
        if skipped(install) { return }
        let mem = try TempMemory(size: 32 << 20, zeroPercent: 10, seed: 79)
        let server = try startServer(mem)
        defer { server.stop() }
        let cmp = ByteComparison(expected: mem.mapping.bytes)
        let r = try runDestination(port: server.port, touch: .sequential, threads: 2, background: true, install: install,
                                   prefetch: .adaptive, compare: cmp, rate: 16 << 20)
        print("prefetch with a stream (\(install)): \(r.faults) faults, \(r.demandPages) demand, \(r.prefetchPages) prefetch (\(r.prefetchHits) shown used), \(r.backgroundPages) background of \(r.nonZeroPages) non-zero pages")
        #expect(cmp.firstDifference == nil, "first differing byte at \(String(describing: cmp.firstDifference))")
        #expect(r.digestMatch && r.sourceConfirmedDigest)
        #expect(r.demandPages + r.prefetchPages + r.backgroundPages == UInt64(r.nonZeroPages), "every page came once")
        #expect(r.pagesSentTwice == 0 && server.stats.pagesSentTwice.load(ordering: .relaxed) == 0)
        #expect(r.prefetchPages > 0, "readers ahead of a 16 MiB/s stream are prefetched for")
        // Only what the first faults planned before the stream started (its
        // zero map) may have gone on the demand channel: a few guest pages.
        if install == .copy {
            #expect(r.prefetchPagesOnDemandChannel >= r.prefetchPages, "copy path: the prefetch stays on the demand channel")
        } else {
            #expect(r.prefetchPagesOnDemandChannel * 20 < r.prefetchPages, "\(r.prefetchPagesOnDemandChannel) of \(r.prefetchPages) prefetched pages asked for on the demand channel")
        }
        #expect(server.stats.prefetchPages.load(ordering: .relaxed) == r.prefetchPages)
    }

    @Test(.timeLimit(.minutes(3)))
    func randomReadersGetNoPrefetch() throws {
        let mem = try TempMemory(size: 16 << 20, zeroPercent: 10, seed: 78)
        let server = try startServer(mem)
        defer { server.stop() }
        let cmp = ByteComparison(expected: mem.mapping.bytes)
        let r = try runDestination(port: server.port, touch: .random, threads: 2, background: false, prefetch: .adaptive, compare: cmp)
        #expect(cmp.firstDifference == nil)
        #expect(r.digestMatch)
        // 4096 pages at random: a chance pair of near faults may start a short
        // trend, never more than a few windows' worth.
        #expect(r.prefetchPages < UInt64(r.nonZeroPages) / 20, "\(r.prefetchPages) pages prefetched for random reads")
        #expect(r.demandPages + r.prefetchPages == UInt64(r.nonZeroPages))
    }

    /// The background connection carries the prefetch (while a stream runs):
    /// the source serves a prefetch before the stream's requests read ahead of
    /// it, and every other frame in the order it came.
    @Test func theMainChannelServesPrefetchBeforeTheStreamQueuedAheadOfIt() throws {
        let (a, b) = try StreamRecordTests.socketPair()
        let destination = TCPConnection(fd: a, peer: "destination", maxBody: 1 << 20)
        let source = TCPConnection(fd: b, peer: "source", maxBody: 1 << 20)
        defer { destination.close(); source.close() }
        source.readAhead = true
        func gather(_ id: UInt64, _ c: PageClass, _ page: UInt64) -> Message {
            .gatherRequest(GatherRequest(firstRequestID: id, pageClass: c, runs: [GatherRun(region: 0, pageOffset: page, pageCount: 4)]))
        }
        let frames: [Message] = [gather(1, .background, 0), gather(2, .background, 100), gather(3, .prefetch, 50),
                                 .zeroMapRequest(ZeroMapRequest(region: 0, firstPage: 0, pageCount: 8)),
                                 .pageRequest(PageRequest(requestID: 4, region: 0, pageClass: .prefetch, pageOffset: 60, pageCount: 2)),
                                 gather(5, .background, 200)]
        for f in frames { try destination.send(f) }
        var queue = PageServer.FrameQueue()
        var order: [String] = []
        for _ in frames.indices {
            switch try queue.next(source) {
            case .gatherRequest(let g): order.append("gather \(g.firstRequestID)")
            case .pageRequest(let r): order.append("page \(r.requestID)")
            case .zeroMapRequest: order.append("zero map")
            case let m: order.append("\(m.type)")
            }
        }
        #expect(order == ["gather 3", "page 4", "gather 1", "gather 2", "zero map", "gather 5"])
    }

    @Test func theSourceAnswersDemandBeforePrefetch() {
        let p = PageRequest(requestID: 1, region: 0, pageClass: .prefetch, pageOffset: 10, pageCount: 16)
        let d = PageRequest(requestID: 2, region: 0, pageClass: .demand, pageOffset: 5, pageCount: 1)
        let b = PageRequest(requestID: 3, region: 0, pageClass: .background, pageOffset: 100, pageCount: 128)
        let d2 = PageRequest(requestID: 4, region: 0, pageClass: .demand, pageOffset: 7, pageCount: 1)
        #expect(PageServer.demandFirst([p, d, b, d2]).map(\.requestID) == [2, 3, 4, 1])
        #expect(PageServer.demandFirst([d, b, d2, p]).map(\.requestID) == [2, 3, 4, 1], "nothing to move")
        #expect(PageServer.demandFirst([b, d]).map(\.requestID) == [3, 2], "other classes keep their order")
    }
}
