import CPostcopy
import Logging
import PostcopyCore
import PostcopyTransport
import PostcopyWire
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// The source page server. Each accepted connection gets its own thread, so a
/// demand reply (urgent connection) never waits behind a background batch being
/// written on the main connection; the main connection's thread runs at
/// `backgroundPriority`.
///
/// Split by concern: the channel handshake and message dispatch
/// (`PageServer+Channel`), one handler per control message
/// (`PageServer+Control`), authentication, page replies and the zero map each
/// in their own extension file.
public final class PageServer: Sendable {
    public let memory: SourceMemory
    public let stats = SourceStats()
    public let logger: Logger
    public let exitAfterCompletion: Bool
    /// Priority of the thread serving a main connection (control + background batches).
    public let backgroundPriority: ThreadPriority
    private let listener: any PageChannelListener
    let sessions = SessionTable()
    let connections = Locked<[ObjectIdentifier: any FrameConnection]>([:])
    private let acceptThread = Locked<PThread?>(nil)
    private let threads = Locked<[PThread]>([])
    let done: EventFD
    let stopping = Atomic<Bool>(false)

    public var port: Int { listener.port }

    /// Shared key: when set, a peer must prove it (and this source proves it)
    /// before it learns anything but an error.
    public let authKey: [UInt8]?
    /// Whether frames after the authentication are encrypted (only with a key;
    /// a destination asking for the other mode is refused).
    public let encrypted: Bool

    /// Remote READ access to guest RAM (RDMA), offered on authenticated main
    /// connections once the guest paused; nil = page replies only.
    public let rdma: (any RemoteReadProvider)?

    /// Copies RAM while the guest runs, for the one destination that asks
    /// (`PrecopyController`); nil: pages are served only after the pause.
    public let precopy: PrecopyController?

    /// Serves on a TCP listener at `endpoint`.
    public convenience init(memory: SourceMemory, listen endpoint: Endpoint, exitAfterCompletion: Bool,
                            backgroundPriority: ThreadPriority = .normal, authKey: [UInt8]? = nil, encryption: StreamEncryption = .on,
                            rdma: (any RemoteReadProvider)? = nil, precopy: PrecopyController? = nil, logger: Logger) throws(TransportError) {
        try self.init(memory: memory, listener: try TCPListener(endpoint), exitAfterCompletion: exitAfterCompletion,
                      backgroundPriority: backgroundPriority, authKey: authKey, encryption: encryption, rdma: rdma, precopy: precopy, logger: logger)
    }

    /// Serves the page channels `listener` accepts.
    public init(memory: SourceMemory, listener: any PageChannelListener, exitAfterCompletion: Bool,
                backgroundPriority: ThreadPriority = .normal, authKey: [UInt8]? = nil, encryption: StreamEncryption = .on,
                rdma: (any RemoteReadProvider)? = nil, precopy: PrecopyController? = nil, logger: Logger) throws(TransportError) {
        self.rdma = rdma
        encrypted = encryption.applies(withKey: authKey)
        self.precopy = precopy
        self.authKey = authKey
        self.memory = memory
        self.backgroundPriority = backgroundPriority
        self.logger = logger
        self.exitAfterCompletion = exitAfterCompletion
        self.listener = listener
        do { done = try EventFD() } catch { throw .system(error) }
    }

    /// Starts the accept thread.
    public func start() {
        let t = PThread(name: "src-accept") { [self] in acceptLoop() }
        acceptThread.withLock { $0 = t }
    }

    /// How often the waits below look at the stop flag (ms / µs).
    static let donePollIntervalMs: Int32 = 1000
    static let idlePollIntervalUs: UInt32 = 20_000

    /// Blocks until a session completed (with `exitAfterCompletion`) or `stop()`.
    public func waitUntilDone() {
        while cpc_poll1(done.fd.raw, Int16(POLLIN), Self.donePollIntervalMs) == 0 {}
    }

    /// Blocks until `sessions` sessions completed and every connection has
    /// closed (the destination's VMM and daemon are both done with this
    /// source), or `stop()`.
    public func waitUntilCompletedAndIdle(sessions: Int = 1) {
        while !stopping.load(ordering: .relaxed) {
            if stats.completedSessions.load(ordering: .relaxed) >= UInt64(max(sessions, 1)) && connections.withLock({ $0.isEmpty }) { return }
            usleep(Self.idlePollIntervalUs)
        }
    }

    /// Shuts the listener and every connection, then joins all threads.
    public func stop() {
        guard !stopping.exchange(true, ordering: .acquiringAndReleasing) else { return }
        listener.shutdown()
        // No connection can be added once the accept thread is gone.
        acceptThread.withLock { $0 }?.join()
        connections.withLock { for c in $0.values { c.shutdown() } }
        let all = threads.withLock { $0 }
        for t in all { t.join() }
        rdma?.stop()
        done.signal()
    }

    /// Frames before the handshake: a hello or an authentication response.
    static let handshakeMaxBody = 1 << 16

    private func acceptLoop() {
        while !stopping.load(ordering: .relaxed) {
            let conn: (any FrameConnection)?
            do { conn = try listener.acceptConnection(maxBody: Self.handshakeMaxBody) } catch {
                logger.error("accept failed: \(error)")
                continue
            }
            guard let conn else { return }
            let key = ObjectIdentifier(conn)
            connections.withLock { $0[key] = conn }
            let t = PThread(name: "src-conn") { [self] in
                serve(conn)
                stats.bytesSent.add(conn.bytesSent, ordering: .relaxed)
                stats.bytesReceived.add(conn.bytesReceived, ordering: .relaxed)
                stats.bytesEncrypted.add(conn.bytesEncrypted, ordering: .relaxed)
                connections.withLock { _ = $0.removeValue(forKey: key) }
                conn.close()
            }
            threads.withLock { $0.append(t) }
        }
    }

    /// Serves one connection until it closes. Bad input from the peer gets an
    /// error frame and closes this connection only.
    func serve(_ conn: any FrameConnection) {
        do {
            try serveChannel(conn)
        } catch {
            switch error {
            case .closed:
                logger.debug("peer \(conn.peer) closed")
            case .wire(let w):
                refuse(conn, w.description)
            case .protocolViolation(let s):
                refuse(conn, s)
            default:
                if !stopping.load(ordering: .relaxed) { logger.warning("connection \(conn.peer) failed: \(error)") }
            }
        }
    }

    /// A peer that broke the protocol: counted, told why, then closed.
    private func refuse(_ conn: any FrameConnection, _ why: String) {
        stats.rejectedConnections.add(1, ordering: .relaxed)
        logger.warning("closing \(conn.peer): \(why)")
        try? conn.send(.error(ErrorMessage(code: .protocolViolation, message: why)))
    }
}
