import CPostcopy
import Foundation
import PostcopyCore
import PostcopyDestination
import PostcopyTransport
import PostcopyWire

/// Serving one VMM from its handoff until it goes away.
extension HandoffServer {
    /// How often the session loop samples progress and looks for messages (ms).
    static let sessionPollIntervalMs: Int32 = 50
    /// How long a completed session waits for the background stream to end
    /// before acknowledging completion to the source (ms).
    static let backgroundDrainTimeoutMs: Int32 = 30_000

    func serveVMM(_ conn: OwnedFD) {
        let startedAt = nowNanoseconds()
        let pid = cpc_peer_pid(conn.raw)
        let json: [UInt8]
        let uffdFD: Int32
        var memoryFDs: [Int32]
        do {
            (json, uffdFD, memoryFDs) = try receiveHandoff(conn)
        } catch {
            reject(pid, error)
            return
        }
        let uffd = Userfaultfd(adopting: uffdFD)
        let regions: [VMMRegion]
        var shared: VMMSharedMemory?
        var config = engineConfig
        config.observer = metrics.observer
        do throws(HandoffError) {
            defer { for fd in memoryFDs { close(fd) } }  // until VMMSharedMemory owns them
            regions = try HandoffMessage.parse(json, hostPageSize: Int(getpagesize()))
            try HandoffMessage.checkFileDescriptors(regions, extra: memoryFDs.count)
            if HandoffMessage.memoryFileCount(regions) > 0 {
                let fds = memoryFDs
                memoryFDs = []
                let s = try VMMSharedMemory(regions: regions, fds: fds, vmmPid: pid, hostPageSize: Int(getpagesize()))
                config.installPath = s.installPath
                shared = s
            }
        } catch {
            reject(pid, error)
            return
        }
        defer { withExtendedLifetime(shared) {} }  // the aliases outlive the engine
        // The engine's own bookkeeping too (for as many source pages as the
        // regions hold; an engine for another count makes its own).
        let storage = EngineStorage(totalPages: regions.reduce(0) { $0 + Int($1.size) } / Int(getpagesize()))
        // Memory preallocated: no allocation is left for after the pause. (Not
        // after the engine's setup: over RDMA the source grants READ access
        // only once paused, so the channels, and the alias's registration with
        // them, come after the pause.)
        onPrepared?(pid, config.installPath.name, Double(shared?.preallocationNanoseconds ?? 0) / 1e9)
        // 2 MiB (hugetlbfs) guest pages are fetched and installed whole.
        let guestPage = Int(regions[0].pageSize)
        config.guestPageSize = guestPage
        // The VMM's own source when it names one, else the daemon's.
        var endpoint = source
        if let named = regions[0].source {
            guard let e = Endpoint(parsing: named) else {
                reject(pid, .invalidRegion("postcopy_source \"\(named.prefix(80))\" is not HOST:PORT"))
                return
            }
            endpoint = e
            logger.info("VMM pid \(pid): pages from \(endpoint)")
        }
        let transport = makeTransport(guestPage: guestPage, config: config, source: endpoint)
        defer { transport.close() }
        let engine: PostcopyEngine
        do {
            engine = try makeEngine(uffd: uffd, regions: regions, transport: transport, config: config, storage: storage)
        } catch let e as HandoffError {
            reject(pid, e)
            return
        } catch {
            reject(pid, .source("\(error)"))
            return
        }
        logger.info("VMM pid \(pid): serving \(regions.count) region(s), \(formatBytes(Double(regions.reduce(0) { $0 + $1.size })))")
        let cpu0 = processCPUNanoseconds()
        metrics.sessionStarted()
        var cursor = HandoffMetricsCursor()
        engine.start()
        var completed = false
        var cpuToFullCopy: UInt64?
        var failure: String?
        var progress: [[UInt64]] = []
        var apf: APFChannel?
        defer { apf?.close() }
        var notify = false, notified = false
        func sample() {
            cursor.update(metrics, engine: engine, transport: transport)
            let c = engine.counters
            progress.append([nowNanoseconds(), c.demandPages.load(ordering: .relaxed), c.backgroundPages.load(ordering: .relaxed),
                             UInt64(c.settledPages.load(ordering: .relaxed))])
        }
        // A VMM that asked is told as soon as every page is in (before the
        // source's acknowledgement: a paused guest is waiting), or of the failure.
        func tellVMM() {
            guard notify, !notified, completed || failure != nil else { return }
            notified = true
            let answer = CompletionNotice.Answer(complete: completed, pages: completed ? engine.table.totalPages : nil, error: failure)
            let line = CompletionNotice.encode(answer)
            let sent = line.withUnsafeBytes { send(conn.raw, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
            if sent != line.count { logger.warning("VMM pid \(pid): the completion notice was not delivered (\(SystemError("send", errno: errno)))") }
        }
        // Serve until the VMM goes away (its socket closes); after completion the
        // engine keeps serving late zero-page faults and REMOVE events.
        while !stopping.load(ordering: .relaxed) {
            if !completed { sample() }
            // Woken by the completion too: a VMM waiting for every page (pure
            // precopy) is told at once, not at the next sample.
            let watching = completed || failure != nil ? -1 : engine.completionDescriptor
            let ready = cpc_poll2(conn.raw, watching, Self.sessionPollIntervalMs)
            if ready > 0, ready & 1 != 0, !receiveLaterMessage(conn, pid: pid, engine: engine, apf: &apf, notify: &notify) { break }
            if ready > 0, ready & 2 != 0 {  // the engine completed or failed (watched only until then)
                if let e = engine.failureReason {
                    failure = e.description
                    logger.error("VMM pid \(pid): postcopy failed: \(e); its vCPUs stay parked on missing pages")
                } else {
                    completed = true
                    cpuToFullCopy = processCPUNanoseconds() - cpu0
                    sample()
                    tellVMM()
                    finish(pid: pid, engine: engine, transport: transport)
                }
            }
            tellVMM()
        }
        engine.stop()
        cursor.update(metrics, engine: engine, transport: transport)
        if metrics.sessionEnded(completed: completed) == 0 {
            // The last VMM gone: what the sessions' buffers took goes back to
            // the host (glibc keeps freed heap otherwise), for the next ones.
            _ = cpc_malloc_trim()
        }
        var report = sessionReport(pid: pid, regions: regions, engine: engine, transport: transport, completed: completed,
                                   failure: failure, cpuSeconds: Double(processCPUNanoseconds() - cpu0) / 1e9, progress: progress)
        report.installPath = config.installPath.name
        report.cpuSecondsToFullCopy = cpuToFullCopy.map { Double($0) / 1e9 }
        report.preallocationSeconds = Double(shared?.preallocationNanoseconds ?? 0) / 1e9
        report.replayPages = engine.counters.replayPages.load(ordering: .relaxed)
        report.replayRequestedAtNs = engine.counters.replayRequestedAt.load(ordering: .relaxed)
        report.workingSetRefused = engine.workingSetRefusal
        report.rssOutsideGuestMaxBytes = residentMemory.maxBytes(since: startedAt)
        report.rssOutsideGuestIdleBytes = residentMemory.idleBytes
        if completed, let out = workingSetOut, let ws = engine.recordedWorkingSet() {
            do {
                try ws.write(to: out)
                report.workingSetRecordedPages = ws.entries.count
                logger.info("VMM pid \(pid): working set of \(ws.entries.count) pages written to \(out)")
            } catch {
                logger.error("VMM pid \(pid): writing the working set to \(out) failed: \(error)")
            }
        }
        stats.reports.withLock {
            $0.append(report)
            // The latest only: a daemon serving VMMs for months must not keep them all.
            if $0.count > HandoffStats.reportsKept { $0.removeFirst($0.count - HandoffStats.reportsKept) }
        }
        onSessionEnd?(report)
        logger.info("VMM pid \(pid) went away; its session is released")
    }

    /// Every page of the VMM is in: tell the source (once the stream ended) and the caller.
    private func finish(pid: Int32, engine: PostcopyEngine, transport: Transport) {
        stats.completed.add(1, ordering: .relaxed)
        // Replies for pages the VMM removed may still be on their way
        // on the main connection; it is free once the stream has ended.
        let idle = engine.waitForBackgroundDone(timeoutMs: Self.backgroundDrainTimeoutMs)
        let ack = idle ? try? transport.complete(Complete(pagesReceived: UInt64(engine.table.totalPages), digest: nil),
                                                 reconnectingOnce: engineConfig.recoveryDeadline > 0) : nil
        logger.info("VMM pid \(pid): every page is in (source acknowledged: \(ack != nil))")
        onComplete?(pid, engine.streamEnd)
    }

    private func sessionReport(pid: Int32, regions: [VMMRegion], engine: PostcopyEngine, transport: Transport, completed: Bool,
                               failure: String?, cpuSeconds: Double, progress: [[UInt64]]) -> HandoffSessionReport {
        let c = engine.counters
        let wire = transport.bytesOnWire
        let hist = engine.faultLatencyHistogram
        var report = HandoffSessionReport(
            vmmPid: pid, transport: transport.name, regions: regions.count, guestBytes: Int(regions.reduce(0) { $0 + $1.size }), completed: completed,
            error: failure, faults: c.faults.load(ordering: .relaxed), demandPages: c.demandPages.load(ordering: .relaxed),
            backgroundPages: c.backgroundPages.load(ordering: .relaxed), zeroPagesFaulted: c.zeroFaults.load(ordering: .relaxed),
            zeroPagesMappedAhead: c.zeroPagesAhead.load(ordering: .relaxed),
            removeEvents: c.removedRanges.load(ordering: .relaxed),
            timeToFullCopySeconds: completed ? Double(engine.streamEnd - engine.streamStart) / 1e9 : nil,
            faultLatency: LatencySummary(hist), faultLatencyCDF: latencyCDF(hist),
            stallSeconds: Double(engine.stallNanoseconds) / 1e9, zeroPages: c.zeroPagesKnown.load(ordering: .relaxed) + Int(c.zeroPagesReceived.load(ordering: .relaxed)),
            bytesSent: wire.sent, bytesReceived: wire.received, cpuSeconds: cpuSeconds,
            progress: progress, pagesCopied: c.pagesCopied.load(ordering: .relaxed),
            pagesContinued: c.pagesContinued.load(ordering: .relaxed), pagesReceivedInPlace: c.pagesReceivedInPlace.load(ordering: .relaxed),
            removedInFlight: c.removedInFlight.load(ordering: .relaxed))
        report.encrypted = transport.encrypted
        report.bytesDecrypted = transport.bytesThroughCipher.decrypted
        report.precopyPasses = c.precopyPasses.load(ordering: .relaxed)
        report.precopyPages = c.precopyPages.load(ordering: .relaxed)
        report.precopyStalePages = c.precopyStalePages.load(ordering: .relaxed)
        report.cleanPagesMapped = c.cleanPagesMapped.load(ordering: .relaxed)
        report.cleanPagesReleased = c.cleanPagesReleased.load(ordering: .relaxed)
        report.streamedPagesHeld = c.streamedPagesHeld.load(ordering: .relaxed)
        report.streamedPagesReleased = c.streamedPagesReleased.load(ordering: .relaxed)
        report.cleanPageFaults = c.cleanPageFaults.load(ordering: .relaxed)
        report.faultsParkedOnFinalSet = c.faultsParkedOnFinalSet.load(ordering: .relaxed)
        report.finalSetAppliedAtNs = c.finalSetAppliedAt.load(ordering: .relaxed)
        report.finalSetReceivedAtNs = c.finalSetReceivedAt.load(ordering: .relaxed)
        report.engineStartedAtNs = engine.streamStart
        report.prefetch = engineConfig.prefetch.rawValue
        report.prefetchRequestedPages = c.prefetchRequestedPages.load(ordering: .relaxed)
        report.prefetchPages = c.prefetchPages.load(ordering: .relaxed)
        report.prefetchHits = c.prefetchHits.load(ordering: .relaxed)
        report.prefetchLateHits = c.prefetchLateHits.load(ordering: .relaxed)
        report.prefetchPagesOnDemandChannel = c.prefetchPagesOnDemandChannel.load(ordering: .relaxed)
        report.demandRequestLatency = engine.demandRequestLatency
        return report
    }
}
