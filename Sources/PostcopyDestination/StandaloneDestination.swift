import CPostcopy
import Histogram
import Logging
import PostcopyCore
import PostcopyTransport
import PostcopyWire
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// Runs a destination on its own: maps and registers guest RAM itself, touches
/// it like a guest would (threads), and verifies the digest at the end.
public final class StandaloneDestination: Sendable {
    public let logger: Logger
    public let options: DestinationOptions
    /// Live counters once the engine runs (for a progress bar).
    public let live = Locked<(EngineCounters, Int)?>(nil)
    /// The engine of the current run, for a test's watchdog message.
    @_spi(Testing) public let debugEngine = Locked<PostcopyEngine?>(nil)

    public init(options: DestinationOptions, logger: Logger) {
        self.options = options
        self.logger = logger
    }

    /// `SetupRetry.run` with this run's deadline; a final failure is the run's.
    private func retrying<T>(_ stage: String, _ then: String, since: UInt64 = nowNanoseconds(), recoveries: inout [UInt64],
                             retryable: (TransportError) -> Bool,
                             _ attempt: (_ isRetry: Bool) throws(TransportError) -> T) throws(DestinationError) -> T {
        do {
            return try SetupRetry(deadline: options.engine.recoveryDeadline, logger: logger)
                .run(stage, then, since: since, recoveries: &recoveries, retryable: retryable, attempt)
        } catch { throw .transport(error) }
    }

    public func run(transport: Transport, transportReason: String) throws(DestinationError) -> DestinationReport {
        let t0 = nowNanoseconds()
        let cpu0 = processCPUNanoseconds()
        let uffd: Userfaultfd
        do { uffd = try Userfaultfd(features: StandaloneGuestMemory.uffdFeatures(options.install)) } catch { throw .system(error) }

        // A connection cut before the session exists is simply tried again; only
        // a connection that was up and broke: a source that refuses or does not
        // exist is reported at once, not retried for a minute.
        var setupRecoveries: [UInt64] = []
        let info = try retrying("the handshake", "trying again", since: t0, recoveries: &setupRecoveries,
                                retryable: SetupRetry.handshakeRetryable) { (_) throws(TransportError) in
            try transport.connect()
        }
        let table = info.table
        guard table.pageSize == Int(getpagesize()) else {
            throw .incompatible("source page size \(table.pageSize) differs from this host's \(getpagesize()); huge-page guests need the VMM handoff")
        }
        logger.info("session \(info.welcome.sessionID): \(table.regions.count) region(s), \(formatBytes(Double(table.totalPages * table.pageSize)))")

        // Guest RAM (and, for continue, the preallocated aliases), before anything streams.
        let memory: StandaloneGuestMemory
        do { memory = try StandaloneGuestMemory(table: table, mode: options.install, uffd: uffd) } catch { throw .system(error) }
        let (mappings, regions) = (memory.guest, memory.regions)
        var config = options.engine
        config.installPath = memory.installPath
        let guestRanges = memory.excludedRanges
        let rss = ResidentMemorySampler(excluding: guestRanges)
        defer { _ = rss.finish(excluding: guestRanges) }  // also on every error path

        // Control: zero map and device state before anything streams.
        var demand: PageChannel?
        var background: PageChannel?
        // A connection lost during this setup is recovered like one lost later:
        // rejoin the session (with backoff, until the deadline) and ask again.
        let (zeroMaps, deviceState) = try retrying("setup", "reconnecting", recoveries: &setupRecoveries,
                                                   retryable: { $0.isConnectionLoss }) { (isRetry) throws(TransportError) in
            if isRetry {
                (demand, background) = (nil, nil)
                if let (d, b) = try? transport.reconnect() { (demand, background) = (d, b) }
            }
            let zeroMaps = try transport.fetchWholeZeroMap(table)
            let deviceState = try transport.fetchDeviceState(timeoutMs: 60_000)
            if demand == nil { demand = try transport.openChannel(.demand) }
            if background == nil { background = try transport.openChannel(.background) }
            return (zeroMaps, deviceState)
        }
        guard let demand, let background else { throw .transport(.closed("no channels to the source")) }
        if let path = options.deviceStateOut {
            do { try writeFile(path, deviceState) } catch { throw .system(error) }
        }
        let handshakeDone = nowNanoseconds()

        let engine: PostcopyEngine
        do {
            engine = try PostcopyEngine(uffd: uffd, regions: regions, session: info, zeroMaps: zeroMaps,
                                        demand: demand, background: background,
                                        reconnect: { () throws(TransportError) in try transport.reconnect() },
                                        config: config, logger: logger)
        } catch { throw .system(error) }
        live.withLock { $0 = (engine.counters, table.totalPages) }
        debugEngine.withLock { $0 = engine }
        let cpuAtStart = processCPUNanoseconds()
        engine.start()

        // The guest stand-in: threads touching every page (reads, so the digest
        // still compares against the source's RAM at pause).
        let touch = GuestToucher(mode: options.touch, threads: options.threads, seed: options.seed,
                                 thinkNanoseconds: UInt64(options.thinkMicroseconds) * 1000,
                                 regions: regions, pageSize: table.pageSize, engine: engine, onTouch: options.onTouch)
        touch.start()
        var waitError: TransportError?
        do { try engine.waitForCompletion() } catch { waitError = error }
        let cpuToFullCopy = processCPUNanoseconds() - cpuAtStart
        if let waitError {
            // Guest threads stay parked on their faults; the caller exits non-zero.
            engine.stop()
            throw .transport(waitError)
        }
        engine.stop()
        // Every page is in: give the memory back to the ordinary fault path.
        do { for r in regions { try uffd.unregisterAndWake(r.range) } } catch { throw .system(error) }
        let touchLatency = touch.join()

        let d0 = nowNanoseconds()
        let digest = MemoryDigest.compute(regions: mappings.map { UnsafeRawBufferPointer($0.bytes) })
        let d1 = nowNanoseconds()
        options.inspect?(mappings.map { $0.bytes })
        let ack: CompleteAck
        let complete = Complete(pagesReceived: UInt64(table.totalPages), digest: digest)
        do { ack = try transport.complete(complete, reconnectingOnce: options.engine.recoveryDeadline > 0) } catch {
            throw .transport(error)
        }
        let wire = transport.bytesOnWire
        let cipher = transport.bytesThroughCipher
        transport.close()
        let rssMax = rss.finish(excluding: guestRanges)

        let c = engine.counters
        let zeroPages = engine.zeroPagesAtStart
        let nonZero = table.totalPages - zeroPages
        var report = DestinationReport(
            transport: transport.name, transportReason: transportReason, sessionID: info.welcome.sessionID,
            pageSize: table.pageSize, guestBytes: table.totalPages * table.pageSize, totalPages: table.totalPages,
            zeroPages: zeroPages, nonZeroPages: nonZero,
            demandPages: c.demandPages.load(ordering: .relaxed), backgroundPages: c.backgroundPages.load(ordering: .relaxed),
            zeroPagesFaulted: c.zeroFaults.load(ordering: .relaxed), zeroPagesMappedAhead: c.zeroPagesAhead.load(ordering: .relaxed), faults: c.faults.load(ordering: .relaxed),
            faultsCoalesced: c.faultsCoalesced.load(ordering: .relaxed), eexist: c.eexist.load(ordering: .relaxed),
            eagain: c.eagain.load(ordering: .relaxed), bytesSent: wire.sent, bytesReceived: wire.received,
            wireOverhead: nonZero == 0 ? 0 : Double(wire.received) / Double(nonZero * table.pageSize),
            handshakeSeconds: Double(handshakeDone - t0) / 1e9, installPath: options.install.rawValue,
            preallocationSeconds: Double(memory.preallocationNanoseconds) / 1e9,
            timeToFullCopySeconds: Double(engine.streamEnd - engine.streamStart) / 1e9,
            digestSeconds: Double(d1 - d0) / 1e9, totalSeconds: Double(nowNanoseconds() - t0) / 1e9,
            faultLatency: engine.faultLatency, guestTouchLatency: touchLatency.summary,
            touchedPages: touchLatency.pages, deviceStateBytes: deviceState.count,
            sourceDigest: MemoryDigest.hex(info.welcome.digest), destinationDigest: MemoryDigest.hex(digest),
            digestMatch: digest == info.welcome.digest, sourceConfirmedDigest: ack.digestMatches,
            pagesSentTwice: ack.pagesSentTwice, rssOutsideGuestMaxBytes: rssMax,
            cpuSeconds: Double(processCPUNanoseconds() - cpu0) / 1e9, uffdOrigin: uffd.origin,
            recoveryNs: setupRecoveries + engine.recoveryTimes.withLock { $0 })
        report.cpuSecondsToFullCopy = Double(cpuToFullCopy) / 1e9
        report.encrypted = transport.encrypted
        report.bytesDecrypted = cipher.decrypted
        report.prefetchPages = c.prefetchPages.load(ordering: .relaxed)
        report.prefetchHits = c.prefetchHits.load(ordering: .relaxed)
        report.prefetchPagesOnDemandChannel = c.prefetchPagesOnDemandChannel.load(ordering: .relaxed)
        report.pagesCopied = c.pagesCopied.load(ordering: .relaxed)
        report.pagesContinued = c.pagesContinued.load(ordering: .relaxed)
        report.streamedPagesHeld = c.streamedPagesHeld.load(ordering: .relaxed)
        report.streamedPagesReleased = c.streamedPagesReleased.load(ordering: .relaxed)
        report.pagesReceivedInPlace = c.pagesReceivedInPlace.load(ordering: .relaxed)
        withExtendedLifetime(memory) {}  // guest RAM stays mapped until the report is built
        return report
    }
}

func writeFile(_ path: String, _ bytes: [UInt8]) throws(SystemError) {
    let fd = try libcCall("open(\(path))") { open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600) }
    defer { close(fd) }
    var off = 0
    while off < bytes.count {
        let n = try libcCall("write(\(path))") { bytes.withUnsafeBytes { write(fd, $0.baseAddress! + off, bytes.count - off) } }
        off += n
    }
}
