import CPostcopy
import Foundation
import PostcopyCore
import PostcopyDestination
@_spi(Testing) import PostcopyRDMA
import PostcopySource
import PostcopyTransport
import PostcopyWire
import Synchronization
import Testing

/// The RDMA device's IP (soft-RoCE in the test VM: scripts/vm/run.sh exports it).
let rdmaAddress = ProcessInfo.processInfo.environment["POSTCOPY_RDMA_ADDR"]

/// Why the RDMA suite cannot run here, or nil. The host kernel has no RDMA:
/// `scripts/test.sh` runs this suite again inside the soft-RoCE VM.
let rdmaSkipReason: String? = {
    if let r = uffdSkipReason { return r }
    let r: String?
    if rdmaDeviceCount() == 0 {
        r = "no RDMA device on this host (the RDMA suite runs in the soft-RoCE VM: bash scripts/vm/rdma-tests.sh)"
    } else if rdmaAddress == nil {
        r = "POSTCOPY_RDMA_ADDR (the RDMA device's IP) is not set"
    } else {
        r = nil
    }
    if let r { print("SKIP (RDMA suite): \(r)") }
    return r
}()

/// A source serving `mem` over TCP at the RDMA address, with RDMA READ access.
func startRDMASource(_ mem: TempMemory, authKey: [UInt8]? = nil, rdma: Bool = true) throws -> PageServer {
    let sm = try SourceMemory(file: mem.file, pageSize: 4096, deviceState: Array("rdma-vcpu".utf8))
    let r = rdma ? try RDMAServer(host: rdmaAddress!, memory: sm.mapping.base, length: sm.mapping.length,
                                          file: mem.file.fd.raw, logger: testLogger("test.rdma")) : nil
    let server = try PageServer(memory: sm, listen: Endpoint(host: rdmaAddress!, port: 0), exitAfterCompletion: false,
                                authKey: authKey, rdma: r, logger: testLogger("test.source"))
    server.start()
    return server
}

extension PageServer {
    /// The source's RDMA listener (the page server knows it only as a remote-read provider).
    var rdmaServer: RDMAServer? { rdma as? RDMAServer }
}

func runRDMADestination(_ transport: Transport, touch: TouchMode = .random, threads: Int = 4, backgroundRate: Int = 0,
                        install: InstallMode = .copy, compare: ByteComparison) throws -> DestinationReport {
    var options = DestinationOptions()
    options.install = install
    options.touch = touch
    options.threads = threads
    options.engine.backgroundRate = backgroundRate
    options.inspect = { compare.check($0) }
    return try StandaloneDestination(options: options, logger: testLogger("test.dest")).run(transport: transport, transportReason: "test")
}

@Suite("RDMA transport (soft-RoCE)", .serialized, .enabled(if: rdmaSkipReason == nil, "no RDMA here (reason printed above)"))
struct RDMATests {
    /// On both install paths: anonymous RAM (READ into a staging buffer, then
    /// UFFDIO_COPY) and shared RAM (READ straight into the registered,
    /// preallocated alias, then UFFDIO_CONTINUE: no page copied by the CPU).
    @Test(.timeLimit(.minutes(10)), arguments: InstallMode.allCases)
    func migrationByOneSidedReadEveryByteEqual(install: InstallMode) throws {
        let mem = try TempMemory(size: 16 << 20, zeroPercent: 20)
        let server = try startRDMASource(mem)
        defer { server.stop() }
        let cmp = ByteComparison(expected: mem.mapping.bytes)
        let t = RDMATransport(endpoint: Endpoint(host: rdmaAddress!, port: server.port), maxBatchPages: 128)
        let r = try runRDMADestination(t, install: install, compare: cmp)
        print("RDMA \(install): \(r.pagesCopied) pages copied, \(r.pagesContinued) continued, \(r.pagesReceivedInPlace) READ in place")
        if install == .continue {
            #expect(r.pagesCopied == 0, "no UFFDIO_COPY on the RDMA shared-memory path")
            #expect(r.pagesReceivedInPlace == UInt64(r.nonZeroPages), "every non-zero page READ straight into the alias")
        } else {
            #expect(r.pagesReceivedInPlace == 0 && r.pagesContinued == 0)
        }
        #expect(cmp.firstDifference == nil, "first differing byte at \(String(describing: cmp.firstDifference))")
        #expect(r.digestMatch && r.sourceConfirmedDigest)
        #expect(t.name == "rdma" && !t.failedOver)
        #expect(r.faults > 0, "the guest threads must really fault")
        #expect(r.demandPages + r.prefetchPages + r.backgroundPages == UInt64(r.nonZeroPages))
        // One-sided: the source process served no page itself.
        #expect(server.stats.demandPages.load(ordering: .relaxed) == 0)
        #expect(server.stats.backgroundPages.load(ordering: .relaxed) == 0)
        #expect(server.rdmaServer!.acceptedConnections.load(ordering: .relaxed) == 2)
        // Zero pages are never read: RDMA bytes are the non-zero pages exactly.
        #expect(r.bytesReceived >= UInt64(r.nonZeroPages) * 4096)
    }

    @Test(.timeLimit(.minutes(10)))
    func readOutsideTheRegisteredRegionFailsCleanly() throws {
        let mem = try TempMemory(size: 4 << 20, zeroPercent: 10, seed: 11)
        let server = try startRDMASource(mem)
        defer { server.stop() }
        let endpoint = Endpoint(host: rdmaAddress!, port: server.port)
        do {
            let t = RDMATransport(endpoint: endpoint, maxBatchPages: 128)
            defer { t.close() }
            let info = try t.connect()
            _ = try t.fetchDeviceState(timeoutMs: 10_000)
            let offer = try t.rdmaOffer()
            #expect(offer.length == UInt64(mem.mapping.length))
            let ch = try t.openRDMAChannel(.demand)
            // The destination's own check: a request past the region never reaches the NIC.
            let pages = UInt64(info.table.pageCount(region: 0))
            #expect(throws: TransportError.self) {
                try ch.submit(PageRequest(requestID: 1, region: 0, pageClass: .demand, pageOffset: pages, pageCount: 1))
            }
            // The source's NIC refuses a READ one page past its registered RAM.
            let status = try ch.rawReadStatus(address: offer.remoteAddress + offer.length, length: 4096)
            #expect(status != 0, "a READ outside the registered region must fail, got status \(status)")
            ch.close()
        }
        // The source keeps serving: an honest destination migrates every byte.
        let cmp = ByteComparison(expected: mem.mapping.bytes)
        let r = try runRDMADestination(RDMATransport(endpoint: endpoint, maxBatchPages: 128), compare: cmp)
        #expect(cmp.firstDifference == nil)
        #expect(r.digestMatch)
    }

    @Test(.timeLimit(.minutes(10)))
    func noRkeyBeforeTheHandshakeOrWithoutTheKey() throws {
        let mem = try TempMemory(size: 1 << 20, zeroPercent: 10, seed: 12)
        let key = Authentication.nonce()
        let server = try startRDMASource(mem, authKey: key)
        defer { server.stop() }
        let endpoint = Endpoint(host: rdmaAddress!, port: server.port)
        // Asking for RDMA access as the very first frame: an error, never an offer.
        let c = try TCPConnection.connect(endpoint, maxBody: 1 << 20)
        try c.send(.rdmaRequest(RDMARequest()))
        let seen = drainUntilClosed(c)
        #expect(!seen.frames.contains(.rdmaOffer) && seen.closed && seen.error != nil)
        // A destination without the key gets an error before any offer.
        let stranger = RDMATransport(endpoint: endpoint, maxBatchPages: 128)
        #expect(throws: TransportError.self) { _ = try stranger.connect() }
        // A connect request with a token the source never issued is refused by rdma_cm.
        let t = RDMATransport(endpoint: endpoint, maxBatchPages: 128, authKey: key)
        defer { t.close() }
        _ = try t.connect()
        let real = try t.rdmaOffer()
        var forged = real
        forged.token = [UInt8](repeating: 0xA5, count: RDMAOffer.tokenBytes)
        #expect(throws: TransportError.self) { _ = try t.openRDMAChannel(.background, forgedOffer: forged) }
        #expect(server.rdmaServer!.rejectedConnections.load(ordering: .relaxed) == 1)
        // The real token works.
        let ch = try t.openRDMAChannel(.background)
        ch.close()
    }

    @Test(.timeLimit(.minutes(10)))
    func autoFallsBackToTCPWhenTheSourceOffersNoRDMA() throws {
        let mem = try TempMemory(size: 4 << 20, zeroPercent: 20, seed: 13)
        let server = try startRDMASource(mem, rdma: false)
        defer { server.stop() }
        let (t, reason) = try TransportFactory.connect(.auto, endpoint: Endpoint(host: rdmaAddress!, port: server.port), maxBatchPages: 128)
        #expect(reason.contains("auto"))
        let cmp = ByteComparison(expected: mem.mapping.bytes)
        let r = try runRDMADestination(t, compare: cmp)
        #expect(cmp.firstDifference == nil && r.digestMatch)
        let rt = try #require(t as? RDMATransport)
        #expect(rt.decision?.contains("using TCP") == true, "\(rt.decision ?? "no decision")")
        #expect(server.stats.demandPages.load(ordering: .relaxed) + server.stats.backgroundPages.load(ordering: .relaxed) > 0)
    }

    @Test(.timeLimit(.minutes(10)))
    func rdmaTornDownMidMigrationContinuesOverTCP() throws {
        let mem = try TempMemory(size: 16 << 20, zeroPercent: 10, seed: 14)
        let server = try startRDMASource(mem)
        defer { server.stop() }
        let rdma = server.rdmaServer!
        let cmp = ByteComparison(expected: mem.mapping.bytes)
        let t = RDMATransport(endpoint: Endpoint(host: rdmaAddress!, port: server.port), maxBatchPages: 128)
        let result = Locked<Result<DestinationReport, any Error>?>(nil)
        let runner = PThread(name: "test-dest") {
            defer { print("destination finished") }
            // Throttled so that the teardown lands mid-migration.
            let r = Result { try runRDMADestination(t, threads: 2, backgroundRate: 2 << 20, compare: cmp) }
            result.withLock { $0 = r }
        }
        // Both QPs up: pages are moving by RDMA. Then the RDMA side dies for good.
        while rdma.acceptedConnections.load(ordering: .relaxed) < 2 { usleep(10_000) }
        usleep(300_000)
        rdma.refuseNewConnections.store(true, ordering: .relaxed)
        rdma.disconnectAll()
        runner.join()
        let r = try #require(try result.withLock { $0 }?.get())
        #expect(cmp.firstDifference == nil, "first differing byte at \(String(describing: cmp.firstDifference))")
        #expect(r.digestMatch && r.sourceConfirmedDigest)
        #expect(t.failedOver, "the migration must have moved to TCP")
        #expect(r.recoveryNs.count >= 1)
        #expect(server.stats.backgroundPages.load(ordering: .relaxed) > 0, "pages after the teardown came over TCP")
        print("RDMA→TCP failover: recovered in \(r.recoveryNs.map { formatDuration(ns: $0) }), \(server.stats.backgroundPages.load(ordering: .relaxed)) pages over TCP afterwards")
    }

    /// `postcopy migrate` of a 32 MiB guest over RDMA with `extra` arguments:
    /// checks it went well, by RDMA, every page equal; returns its report.
    func migrateOverRDMA(_ extra: [String]) throws -> [String: Any]? {
        let r = try runCLI(["migrate", "--size", "32M", "--before", "1", "--after", "2", "--transport", "rdma",
                            "--address", rdmaAddress!, "--json"] + extra)
        #expect(r.status == 0, "migrate failed: \(r.stderr.suffix(3000))")
        let o = try JSONSerialization.jsonObject(with: Data(r.stdout.utf8)) as? [String: Any]
        #expect(o?["ok"] as? Bool == true)
        #expect(o?["transport_used"] as? String == "rdma")
        let integrity = o?["integrity"] as? [String: Any]
        #expect(integrity?["pages_mismatched"] as? Int == 0)
        #expect(integrity?["pages_verified"] as? Int == (32 << 20) / 4096)
        return o
    }

    /// The README's live migration over RDMA: source guest (RAM registered for
    /// remote READ), page-fault daemon (one-sided READs), destination guest.
    @Test(.timeLimit(.minutes(10)), .enabled(if: postcopyBinary != nil, "no postcopy binary"))
    func runningGuestMigratesOverRDMA() throws {
        let o = try migrateOverRDMA([])
        print("migrate over RDMA (32 MiB, TCG VM): downtime \(o?["downtime_ns"] ?? "?") ns, full copy \(o?["time_to_full_copy_seconds"] ?? "?") s, pages copied \(o?["pages_copied"] ?? "?"), READ in place \(o?["pages_received_in_place"] ?? "?")")
        // Shared guest memory (the default): every page READ into the alias and
        // mapped with CONTINUE; not one through UFFDIO_COPY.
        #expect(o?["install_path"] as? String == "continue")
        #expect(o?["pages_copied"] as? Int == 0)
        #expect((o?["pages_received_in_place"] as? Int ?? 0) > 0)
    }

    /// Hybrid over RDMA: precopy passes by one-sided READ of the running
    /// guest's RAM (each piece protected before it is handed out), the final
    /// dirty set over the TCP control connection, postcopy by READ for the
    /// rest; every page equal to the source's at the pause.
    @Test(.timeLimit(.minutes(10)), .enabled(if: postcopyBinary != nil, "no postcopy binary"))
    func hybridMigrationOverRDMAPrecopiesByRead() throws {
        let o = try migrateOverRDMA(["--workload", "zipf", "--write-percent", "2", "--precopy", "2"])
        let source = o?["source_precopy"] as? [String: Any]
        print("hybrid over RDMA (32 MiB, TCG VM): paused: \(o?["pause_reason"] ?? "?"); passes \(source?["passes"] ?? "?"), final dirty set \(source?["final_dirty_pages"] ?? "?") pages, precopied \(o?["precopy_pages"] ?? "?") pages by READ, source served \(source?["bytes_sent"] ?? "?") bytes itself, downtime \(o?["downtime_ns"] ?? "?") ns")
        #expect((source?["passes"] as? [Int] ?? []).count == 2, "passes: \(source ?? [:])")
        #expect((o?["precopy_pages"] as? Int ?? 0) >= (32 << 20) / 4096, "pass 1 covers every page")
        #expect(source?["bytes_sent"] as? Int == 0, "precopy pages went through the source's CPU, not by READ")
        #expect(o?["pages_copied"] as? Int == 0)
    }

    /// Async page faults with pages fetched by RDMA READ: the daemon's busy-polled
    /// demand QP serves the guest's "page not present" requests; every one gets
    /// its "page ready" and every page is the source's.
    @Test(.timeLimit(.minutes(10)), .enabled(if: postcopyBinary != nil, "no postcopy binary"))
    func asyncPageFaultsOverRDMA() throws {
        let o = try migrateOverRDMA(["--tasks", "8", "--apf"])
        let work = o?["task_work"] as? [String: Any]
        let notPresent = work?["not_present"] as? Int ?? 0
        #expect(notPresent > 0, "the guest took no async fault")
        #expect(work?["ready"] as? Int == notPresent, "one ready per not-present")
        print("APF over RDMA (32 MiB, TCG VM): \(notPresent) not-present, reads in the window \(work?["ops_in_window"] ?? "?")")
    }
}

/// `auto` and `rdma` without a device: testable on any host.
@Suite("transport selection without RDMA", .enabled(if: rdmaDeviceCount() == 0, "this host has an RDMA device"))
struct TransportSelectionTests {
    @Test func autoPicksTCPAndSaysWhy() throws {
        let (t, reason) = try TransportFactory.connect(.auto, endpoint: Endpoint(host: "127.0.0.1", port: 1), maxBatchPages: 128)
        #expect(t is TCPTransport)
        #expect(reason.contains("no RDMA device"))
    }

    @Test func rdmaRequestedWithoutDeviceIsAClearError() {
        do {
            _ = try TransportFactory.connect(.rdma, endpoint: Endpoint(host: "127.0.0.1", port: 1), maxBatchPages: 128)
            Issue.record("--transport rdma must fail without a device")
        } catch {
            #expect(error.description.contains("no RDMA device"))
        }
    }

    @Test func sourceSidePicksTCPOnlyAndSaysWhy() throws {
        let mem = try TempMemory(size: 1 << 20, zeroPercent: 10, seed: 16)
        let log = testLogger("test.factory")
        let tcp = try TransportFactory.serve(.tcp, host: "127.0.0.1", memory: mem.mapping, logger: log)
        #expect(tcp.provider == nil)
        let auto = try TransportFactory.serve(.auto, host: "127.0.0.1", memory: mem.mapping, file: mem.file.fd.raw, logger: log)
        #expect(auto.provider == nil)
        #expect(auto.reason.contains("no RDMA device"))
        #expect(throws: TransportError.self) {
            _ = try TransportFactory.serve(.rdma, host: "127.0.0.1", memory: mem.mapping, logger: log)
        }
    }

    @Test func daemonTransportFallsBackToTCPAndSaysWhy() {
        let (t, reason) = TransportFactory.connectOrTCP(.rdma, endpoint: Endpoint(host: "127.0.0.1", port: 1), maxBatchPages: 128)
        #expect(t is TCPTransport)
        #expect(reason.contains("no RDMA device") && reason.contains("using TCP"))
    }

    @Test func sourceWithoutRDMAAnswersAnErrorAndKeepsTheConnection() throws {
        guard uffdSkipReason == nil else { return }
        let mem = try TempMemory(size: 1 << 20, zeroPercent: 10, seed: 15)
        let server = try startServer(mem, deviceState: [1])
        defer { server.stop() }
        let t = TCPTransport(endpoint: Endpoint(host: "127.0.0.1", port: server.port), maxBatchPages: 128)
        defer { t.close() }
        _ = try t.connect()
        do {
            _ = try t.requestRDMAOffer()
            Issue.record("a TCP-only source must not offer RDMA")
        } catch {
            guard case .peer(let e) = error else { Issue.record("unexpected \(error)"); return }
            #expect(e.code == .rdmaUnavailable)
        }
        // Same connection, still usable.
        #expect(try t.fetchDeviceState(timeoutMs: 5_000) == [1])
    }
}
