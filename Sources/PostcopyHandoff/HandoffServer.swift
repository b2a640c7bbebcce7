import CPostcopy
import Foundation
import Logging
import PostcopyCore
import PostcopyDestination
import PostcopyTransport
import PostcopyWire
import Synchronization

/// Counters of a handoff daemon.
public final class HandoffStats: Sendable {
    public let accepted = Atomic<UInt64>(0)
    public let rejected = Atomic<UInt64>(0)
    public let completed = Atomic<UInt64>(0)
    public let ended = Atomic<UInt64>(0)
    public let lastRejection = Locked<String?>(nil)
    /// The reports of the latest sessions (`reportsKept` at most), oldest first.
    public let reports = Locked<[HandoffSessionReport]>([])
    public static let reportsKept = 64
}

/// The destination daemon's VMM socket, speaking Firecracker's protocol for
/// external page-fault handlers: a VMM connects, sends in one `sendmsg` a JSON
/// array of its regions with its userfaultfd as the single SCM_RIGHTS fd, and
/// keeps the socket open while it runs. Extension: when guest RAM is a shared
/// memory file, the regions name it (`mem_fd_index`, `mem_fd_offset`) and the
/// files follow the userfaultfd as further fds; the daemon then writes pages
/// through its own alias of them and maps them with UFFDIO_CONTINUE
/// (`VMMSharedMemory`). Each VMM gets its own source session and
/// engine; a bad message or a VMM going away ends only that VMM's session.
///
/// Split by concern: receiving the VMM's messages (`HandoffServer+Receive`),
/// its transport and engine (`HandoffServer+Setup`), serving it until it goes
/// away (`HandoffServer+Session`).
public final class HandoffServer: Sendable {
    public let path: String
    public let source: Endpoint
    public let engineConfig: EngineConfig
    public let logger: Logger
    public let stats = HandoffStats()
    /// This daemon's memory outside guest memory, sampled while it serves.
    public let residentMemory: ResidentMemoryLog
    /// Its metrics (swift-metrics: recorded nowhere unless the process
    /// bootstrapped a backend before making the server).
    let metrics = HandoffMetrics()
    private let listenFD: OwnedFD
    let stopping = Atomic<Bool>(false)
    private let acceptThread = Locked<PThread?>(nil)
    /// One thread per VMM connection, joined once it ended (a thread that is
    /// never joined keeps its stack: a long-lived daemon would grow by it with
    /// every VMM).
    private let sessions = Locked<[SessionThread]>([])
    private final class SessionThread: Sendable {
        let done = Atomic<Bool>(false)
        let thread: Locked<PThread?> = Locked(nil)
    }
    private let sessionEnded: EventFD
    /// Told when a VMM's memory is complete (pid, CLOCK_MONOTONIC ns of the last page) and when its session ends.
    public let onComplete: (@Sendable (Int32, UInt64) -> Void)?
    public let onSessionEnd: (@Sendable (HandoffSessionReport) -> Void)?
    /// Told when a VMM's handoff was accepted and its memory prepared, before
    /// its pages stream: (pid, install path, seconds spent preallocating).
    public let onPrepared: (@Sendable (Int32, String, Double) -> Void)?
    /// Told when a VMM's handoff is refused: (pid, the reason).
    public let onRejected: (@Sendable (Int32, String) -> Void)?

    /// Shared key for the source (see `Authentication`), or nil.
    public let authKey: [UInt8]?
    /// Whether the streams to the sources are encrypted (with a key).
    public let encryption: StreamEncryption

    /// How each VMM's pages travel (`TransportFactory`; TCP when that kind
    /// cannot be had for a VMM).
    public let transportKind: TransportKind
    /// Where each session that completes writes the working set it recorded
    /// (`EngineConfig.recordWorkingSetSeconds`); the last one wins.
    public let workingSetOut: String?

    public init(path: String, source: Endpoint, engineConfig: EngineConfig, authKey: [UInt8]? = nil,
                encryption: StreamEncryption = .on, logger: Logger,
                transport: TransportKind = .tcp, workingSetOut: String? = nil,
                onComplete: (@Sendable (Int32, UInt64) -> Void)? = nil,
                onSessionEnd: (@Sendable (HandoffSessionReport) -> Void)? = nil,
                onPrepared: (@Sendable (Int32, String, Double) -> Void)? = nil,
                onRejected: (@Sendable (Int32, String) -> Void)? = nil) throws(HandoffError) {
        self.onPrepared = onPrepared
        self.onRejected = onRejected
        self.transportKind = transport
        self.workingSetOut = workingSetOut
        self.authKey = authKey
        self.encryption = encryption
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
        let gauge = metrics.residentOutsideGuest
        residentMemory = ResidentMemoryLog(onSample: { gauge.record($0) })
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
                reapSessions()
                let entry = SessionThread()
                entry.thread.withLock {
                    $0 = PThread(name: "handoff-vmm") { [self] in
                        serveVMM(conn)
                        conn.close()
                        entry.done.store(true, ordering: .releasing)
                        stats.ended.add(1, ordering: .relaxed)
                        sessionEnded.signal()
                    }
                }
                sessions.withLock { $0.append(entry) }
            }
        }
        acceptThread.withLock { $0 = t }
    }

    /// How often `wait` looks at the stop flag (ms).
    static let waitPollIntervalMs: Int32 = 500

    /// Blocks until `count` VMM sessions have ended (0: until `stop()`).
    /// Joins the threads of the VMMs that are gone.
    private func reapSessions() {
        let ended = sessions.withLock { list -> [SessionThread] in
            let e = list.filter { $0.done.load(ordering: .acquiring) }
            list.removeAll { s in e.contains { $0 === s } }
            return e
        }
        for e in ended { e.thread.withLock { $0 }?.join() }
    }

    public func wait(sessions count: UInt64) {
        while !stopping.load(ordering: .relaxed) {
            reapSessions()
            if count > 0 && stats.ended.load(ordering: .relaxed) >= count { return }
            _ = cpc_poll1(sessionEnded.fd.raw, Int16(POLLIN), Self.waitPollIntervalMs)
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
        for s in sessions.withLock({ $0 }) { s.thread.withLock { $0 }?.join() }
        residentMemory.stop()
    }

    func reject(_ pid: Int32, _ error: HandoffError) {
        metrics.handoffsRefused.increment()
        stats.rejected.add(1, ordering: .relaxed)
        stats.lastRejection.withLock { $0 = error.description }
        logger.error("VMM pid \(pid): handoff refused: \(error)")
        onRejected?(pid, error.description)
    }
}
