import CPostcopy
import Foundation
import Logging
import PostcopyCore
import PostcopyDestination
import PostcopyTransport
import PostcopyWire
import Synchronization

/// What one VMM session did, reported when it ends.
public struct HandoffSessionReport: Sendable, Codable {
    public var vmmPid: Int32
    /// The transport pages moved over ("tcp", "rdma", "rdma→tcp" after a failover).
    public var transport: String
    public var regions: Int
    public var guestBytes: Int
    public var completed: Bool
    public var error: String?
    public var faults: UInt64
    public var demandPages: UInt64
    public var backgroundPages: UInt64
    public var zeroPagesFaulted: UInt64
    public var removeEvents: UInt64
    public var timeToFullCopySeconds: Double?
    public var faultLatency: LatencySummary
    /// [percentile, ns] points of the fault-latency CDF.
    public var faultLatencyCDF: [[Double]]
    /// Total time the guest's threads waited on faults (blocktime summed over vCPUs).
    public var stallSeconds: Double
    public var zeroPages: Int
    public var bytesSent: UInt64
    public var bytesReceived: UInt64
    /// CPU time of the daemon process while this session ran.
    public var cpuSeconds: Double
    /// Pages present over time: [CLOCK_MONOTONIC ns, demand pages, background pages, settled pages].
    public var progress: [[UInt64]]

    enum CodingKeys: String, CodingKey {
        case vmmPid = "vmm_pid", transport, regions, guestBytes = "guest_bytes", completed, error, faults
        case demandPages = "demand_pages", backgroundPages = "background_pages", zeroPagesFaulted = "zero_pages_faulted"
        case removeEvents = "remove_events", timeToFullCopySeconds = "time_to_full_copy_seconds", faultLatency = "fault_latency"
        case faultLatencyCDF = "fault_latency_cdf", stallSeconds = "stall_seconds", zeroPages = "zero_pages"
        case bytesSent = "bytes_sent", bytesReceived = "bytes_received", cpuSeconds = "cpu_seconds", progress
    }
}

/// Counters of a handoff daemon.
public final class HandoffStats: Sendable {
    public let accepted = Atomic<UInt64>(0)
    public let rejected = Atomic<UInt64>(0)
    public let completed = Atomic<UInt64>(0)
    public let ended = Atomic<UInt64>(0)
    public let lastRejection = Locked<String?>(nil)
    public let reports = Locked<[HandoffSessionReport]>([])
}

/// The destination daemon's VMM socket, speaking Firecracker's protocol for
/// external page-fault handlers: a VMM connects, sends in one `sendmsg` a JSON
/// array of its regions with its userfaultfd as the single SCM_RIGHTS fd, and
/// keeps the socket open while it runs. Each VMM gets its own source session and
/// engine; a bad message or a VMM going away ends only that VMM's session.
public final class HandoffServer: Sendable {
    public let path: String
    public let source: Endpoint
    public let engineConfig: EngineConfig
    public let logger: Logger
    public let stats = HandoffStats()
    private let listenFD: OwnedFD
    private let stopping = Atomic<Bool>(false)
    private let acceptThread = Locked<PThread?>(nil)
    private let sessions = Locked<[PThread]>([])
    private let sessionEnded: EventFD
    /// Told when a VMM's memory is complete (pid, CLOCK_MONOTONIC ns of the last page) and when its session ends.
    public let onComplete: (@Sendable (Int32, UInt64) -> Void)?
    public let onSessionEnd: (@Sendable (HandoffSessionReport) -> Void)?

    /// Shared key for the source (see `Authentication`), or nil.
    public let authKey: [UInt8]?

    /// Makes a VMM's transport to the source, given the largest background and
    /// demand request in pages (TCP when nil).
    public typealias TransportFactory = @Sendable (_ maxBatchPages: Int, _ maxDemandPages: Int) -> Transport
    private let makeTransport: TransportFactory?

    public init(path: String, source: Endpoint, engineConfig: EngineConfig, authKey: [UInt8]? = nil, logger: Logger,
                makeTransport: TransportFactory? = nil,
                onComplete: (@Sendable (Int32, UInt64) -> Void)? = nil,
                onSessionEnd: (@Sendable (HandoffSessionReport) -> Void)? = nil) throws(HandoffError) {
        self.makeTransport = makeTransport
        self.authKey = authKey
        self.onComplete = onComplete
        self.onSessionEnd = onSessionEnd
        self.path = path
        self.source = source
        self.engineConfig = engineConfig
        self.logger = logger
        let fd = cpc_unix_listen(path, 16)
        guard fd >= 0 else { throw .system(SystemError("listen on unix socket \(path)", errno: -fd)) }
        listenFD = OwnedFD(fd)
        do { sessionEnded = try EventFD() } catch { throw .system(error) }
    }

    public func start() {
        let t = PThread(name: "handoff-accept") { [self] in
            while !stopping.load(ordering: .relaxed) {
                let c = cpc_unix_accept(listenFD.raw)
                if c < 0 {
                    if c == -EINVAL || c == -EBADF || stopping.load(ordering: .relaxed) { return }
                    continue
                }
                stats.accepted.add(1, ordering: .relaxed)
                let conn = OwnedFD(c)
                let s = PThread(name: "handoff-vmm") { [self] in
                    serveVMM(conn)
                    conn.close()
                    stats.ended.add(1, ordering: .relaxed)
                    sessionEnded.signal()
                }
                sessions.withLock { $0.append(s) }
            }
        }
        acceptThread.withLock { $0 = t }
    }

    /// Blocks until `count` VMM sessions have ended (0: until `stop()`).
    public func wait(sessions count: UInt64) {
        while !stopping.load(ordering: .relaxed) {
            if count > 0 && stats.ended.load(ordering: .relaxed) >= count { return }
            _ = cpc_poll1(sessionEnded.fd.raw, Int16(POLLIN), 500)
            sessionEnded.drain()
        }
    }

    public func stop() {
        guard !stopping.exchange(true, ordering: .acquiringAndReleasing) else { return }
        _ = cpc_shutdown(listenFD.raw)
        acceptThread.withLock { $0 }?.join()
        listenFD.close()
        unlink(path)
        sessionEnded.signal()
        for s in sessions.withLock({ $0 }) { s.join() }
    }

    private func reject(_ pid: Int32, _ error: HandoffError) {
        stats.rejected.add(1, ordering: .relaxed)
        stats.lastRejection.withLock { $0 = error.description }
        logger.error("VMM pid \(pid): handoff refused: \(error)")
    }

    /// One message from a VMM: `n` is recvmsg's result (bytes, 0 at EOF, -errno),
    /// `fds` the descriptors that came with it (at most 4 kept; `truncated` when
    /// there were more).
    private static func receiveMessage(_ conn: OwnedFD, maxBytes: Int) -> (n: Int, bytes: [UInt8], fds: [Int32], nfds: Int32, truncated: Bool) {
        var buf = [UInt8](repeating: 0, count: maxBytes)
        var fds = [Int32](repeating: -1, count: 4)
        var nfds: Int32 = 0, ctrunc: Int32 = 0
        let n = buf.withUnsafeMutableBytes { b in
            fds.withUnsafeMutableBufferPointer { f in
                cpc_recv_with_fds(conn.raw, b.baseAddress, b.count, f.baseAddress, 4, &nfds, &ctrunc)
            }
        }
        return (n, Array(buf.prefix(max(n, 0))), Array(fds.prefix(Int(min(max(nfds, 0), 4)))), nfds, ctrunc != 0)
    }

    /// Reads the one handoff message: JSON bytes and the fds that came with it.
    private func receiveHandoff(_ conn: OwnedFD) throws(HandoffError) -> ([UInt8], Int32) {
        // The VMM sends right after connecting; a silent peer is not a VMM.
        guard cpc_poll1(conn.raw, Int16(POLLIN), 10_000) > 0 else {
            throw .malformedJSON("no handoff message within 10 s")
        }
        let m = Self.receiveMessage(conn, maxBytes: HandoffMessage.maxBytes)
        func closeAll() { for fd in m.fds { close(fd) } }
        if m.n < 0 { closeAll(); throw .system(SystemError("recvmsg from VMM", errno: Int32(-m.n))) }
        if m.n == 0 { closeAll(); throw .malformedJSON("the VMM closed the socket without sending its regions") }
        if m.nfds > 1 || m.truncated { closeAll(); throw .tooManyFileDescriptors(Int(m.nfds)) }
        guard m.nfds == 1 else { throw .noFileDescriptor }
        return (m.bytes, m.fds[0])
    }

    private func serveVMM(_ conn: OwnedFD) {
        let pid = cpc_peer_pid(conn.raw)
        let json: [UInt8]
        let uffdFD: Int32
        do {
            (json, uffdFD) = try receiveHandoff(conn)
        } catch {
            reject(pid, error)
            return
        }
        let uffd = Userfaultfd(adopting: uffdFD)
        let regions: [VMMRegion]
        do {
            regions = try HandoffMessage.parse(json, hostPageSize: Int(getpagesize()))
        } catch {
            reject(pid, error)
            return
        }
        // 2 MiB (hugetlbfs) guest pages are fetched and installed whole.
        let guestPage = Int(regions[0].pageSize)
        var config = engineConfig
        config.guestPageSize = guestPage
        let unitPages = max(guestPage / Int(getpagesize()), 1)
        let transport: Transport = makeTransport?(max(config.batchPages, unitPages), max(64, unitPages))
            ?? TCPTransport(endpoint: source, maxBatchPages: max(config.batchPages, unitPages),
                            maxDemandPages: max(64, unitPages), authKey: authKey)
        defer { transport.close() }
        let engine: PostcopyEngine
        do {
            let info = try transport.connect()
            let table = info.table
            let ps = UInt64(table.pageSize)
            let guest = regions.map {
                GuestRegion(base: $0.base, size: Int($0.size), sourceFirstPage: Int($0.offset / ps))
            }
            if let problem = GuestRegion.layoutProblem(guest, table: table) { throw HandoffError.layout(problem) }
            let demand = try transport.openChannel(.demand)
            let background = try transport.openChannel(.background)
            // The source guest may still be running: the background stream waits
            // for its pause (the device state being published), then streams at
            // once; the source flags all-zero batches itself, so no zero map (and
            // no wait for the source's scan of RAM) is needed. Faults are served now.
            let t = transport
            engine = try PostcopyEngine(uffd: uffd, regions: guest, session: info, zeroMaps: [],
                                        zeroMapProvider: { () throws(TransportError) in
                                            _ = try t.fetchDeviceState(timeoutMs: -1)
                                            return []
                                        },
                                        demand: demand, background: background,
                                        reconnect: { () throws(TransportError) in try t.reconnect() },
                                        config: config, logger: logger)
        } catch let e as HandoffError {
            reject(pid, e)
            return
        } catch {
            reject(pid, .source("\(error)"))
            return
        }
        logger.info("VMM pid \(pid): serving \(regions.count) region(s), \(formatBytes(Double(regions.reduce(0) { $0 + $1.size })))")
        let cpu0 = processCPUNanoseconds()
        engine.start()
        var completed = false
        var failure: String?
        var progress: [[UInt64]] = []
        var apf: APFChannel?
        defer { apf?.close() }
        func sample() {
            let c = engine.counters
            progress.append([nowNanoseconds(), c.demandPages.load(ordering: .relaxed), c.backgroundPages.load(ordering: .relaxed),
                             UInt64(c.settledPages.load(ordering: .relaxed))])
        }
        // Serve until the VMM goes away (its socket closes); after completion the
        // engine keeps serving late zero-page faults and REMOVE events.
        while !stopping.load(ordering: .relaxed) {
            if !completed { sample() }
            let ready = cpc_poll1(conn.raw, Int16(POLLIN), 50)
            if ready > 0 {
                // A later message: the guest enabling async page faults. EOF: the VMM is gone.
                let m = Self.receiveMessage(conn, maxBytes: 4096)
                if m.n <= 0 && m.n != -Int(EAGAIN) && m.n != -Int(EINTR) { break }
                let got = m.fds
                var adopted = false  // from then on the channel owns (and closes) the fds
                do throws(APFError) {
                    guard apf == nil else { throw .badHeader("async page faults are already enabled for this VM") }
                    try APFEnable.parse(m.bytes)
                    guard got.count == 3, !m.truncated else { throw .badHeader("expected 3 fds (channel memfd, request eventfd, completion eventfd), got \(m.nfds)") }
                    adopted = true
                    apf = try APFChannel(memfd: got[0], requestFD: got[1], completionFD: got[2], engine: engine, logger: logger)
                    logger.info("VMM pid \(pid): async page faults enabled")
                } catch {
                    if !adopted { for fd in got { close(fd) } }
                    logger.error("VMM pid \(pid): async page faults refused: \(error) (the guest keeps blocking faults)")
                }
            }
            if !completed, failure == nil, cpc_poll1(engine.completionDescriptor, Int16(POLLIN), 0) > 0 {
                if let e = engine.failureReason {
                    failure = e.description
                    logger.error("VMM pid \(pid): postcopy failed: \(e); its vCPUs stay parked on missing pages")
                } else {
                    completed = true
                    sample()
                    stats.completed.add(1, ordering: .relaxed)
                    // Replies for pages the VMM removed may still be on their way
                    // on the main connection; it is free once the stream has ended.
                    let idle = engine.waitForBackgroundDone(timeoutMs: 30_000)
                    let ack = idle ? try? transport.complete(Complete(pagesReceived: UInt64(engine.table.totalPages), digest: nil)) : nil
                    logger.info("VMM pid \(pid): every page is in (source acknowledged: \(ack != nil))")
                    onComplete?(pid, engine.streamEnd)
                }
            }
        }
        engine.stop()
        let c = engine.counters
        let wire = transport.bytesOnWire
        let hist = engine.faultLatencyHistogram
        let report = HandoffSessionReport(
            vmmPid: pid, transport: transport.name, regions: regions.count, guestBytes: Int(regions.reduce(0) { $0 + $1.size }), completed: completed,
            error: failure, faults: c.faults.load(ordering: .relaxed), demandPages: c.demandPages.load(ordering: .relaxed),
            backgroundPages: c.backgroundPages.load(ordering: .relaxed), zeroPagesFaulted: c.zeroFaults.load(ordering: .relaxed),
            removeEvents: c.removedRanges.load(ordering: .relaxed),
            timeToFullCopySeconds: completed ? Double(engine.streamEnd - engine.streamStart) / 1e9 : nil,
            faultLatency: LatencySummary(hist), faultLatencyCDF: latencyCDF(hist),
            stallSeconds: Double(engine.stallNanoseconds) / 1e9, zeroPages: c.zeroPagesKnown.load(ordering: .relaxed) + Int(c.zeroPagesReceived.load(ordering: .relaxed)),
            bytesSent: wire.sent, bytesReceived: wire.received, cpuSeconds: Double(processCPUNanoseconds() - cpu0) / 1e9,
            progress: progress)
        stats.reports.withLock { $0.append(report) }
        onSessionEnd?(report)
        logger.info("VMM pid \(pid) went away; its session is released")
    }
}
