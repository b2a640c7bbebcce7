import CPostcopy
import CRDMA
import Logging
import PostcopyCore
import PostcopyTransport
import PostcopyWire
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// The source's side of the RDMA transport: an rdma_cm listener on the RDMA
/// device's address, guest RAM registered once with `IBV_ACCESS_REMOTE_READ`
/// only (never remote or local write), and a thread that accepts a connect
/// request only when it presents a token handed out on an authenticated control
/// connection. After that the source's CPU does nothing per page: the NIC
/// answers the destination's READs.
public final class RDMAServer: @unchecked Sendable {
    public let port: UInt16
    public let host: String
    private let listener: OpaquePointer
    private var mr: UnsafeMutableRawPointer?
    private let rkey: UInt32
    private let base: UInt64
    private let length: UInt64
    private let logger: Logger
    private let tokens = Locked<[[UInt8]: UInt64]>([:])
    private let stopFD: EventFD
    private var thread: PThread?
    private let lock = NSLockLite()
    private var connections: Set<UnsafeMutableRawPointer> = []
    public let acceptedConnections = Atomic<UInt64>(0)
    /// Refuse every new connect request (tests standing in for a device that
    /// went away; no operator control offers it yet).
    @_spi(Testing) public let refuseNewConnections = Atomic<Bool>(false)
    public let rejectedConnections = Atomic<UInt64>(0)

    /// A writable alias of a read-only memory file, registered instead of the
    /// caller's mapping on kernels that cannot pin read-only shared memory.
    private let alias: MemoryMapping?

    /// Listens on `host` (the RDMA device's own IP; "0" port = any) and registers
    /// `[base, base + length)` for remote READ. `file`: the descriptor the memory
    /// is mapped from, when that mapping is read-only (see below).
    public init(host: String, port: Int = 0, memory base: UnsafeRawPointer, length: Int, file: Int32? = nil,
                logger: Logger) throws(TransportError) {
        guard rdmaDeviceCount() > 0 else {
            throw .unavailable("no RDMA device on this host (for soft-RoCE: rdma link add rxe0 type rxe netdev IFACE)")
        }
        var l: OpaquePointer?
        var bound: UInt16 = 0
        var err = [CChar](repeating: 0, count: 256)
        let rc = crdma_listen(host, String(port), 16, &l, &bound, &err, err.count)
        guard rc == 0, let l else { throw .unavailable("RDMA listen on \(host): \(errorText(err))") }
        var key: UInt32 = 0
        var mr: UnsafeMutableRawPointer?
        var r2 = crdma_listener_reg_remote_read(l, UnsafeMutableRawPointer(mutating: base), length, &key, &mr)
        var alias: MemoryMapping?
        if r2 == -EFAULT, let file {
            // Before Linux 6.2, ib_umem_get pins with FOLL_WRITE|FOLL_FORCE even for
            // a read-only registration, which a read-only shared mapping refuses.
            // Register a writable alias of the same file instead: the NIC still
            // grants remote READ only, and this process never writes through it.
            let rw = open("/proc/self/fd/\(file)", O_RDWR | O_CLOEXEC)
            if rw >= 0 {
                alias = try? MemoryMapping.file(fd: rw, length: length, writable: true)
                close(rw)
            }
            if let alias { r2 = crdma_listener_reg_remote_read(l, alias.base, length, &key, &mr) }
        }
        guard r2 == 0, let mr else {
            crdma_listener_destroy(l)
            throw .unavailable("ibv_reg_mr of \(length) bytes of guest RAM for remote READ: \(String(cString: strerror(-r2)))\(r2 == -EFAULT ? " (a read-only mapping: this kernel pins for write; give the memory file's descriptor)" : " (RLIMIT_MEMLOCK too low?)")")
        }
        self.alias = alias
        do { stopFD = try EventFD() } catch {
            crdma_dereg(mr)
            crdma_listener_destroy(l)
            throw .local(error)
        }
        self.host = host
        self.listener = l
        self.mr = mr
        self.rkey = key
        self.port = bound
        self.base = UInt64(UInt(bitPattern: alias?.base ?? UnsafeMutableRawPointer(mutating: base)))
        self.length = UInt64(length)
        self.logger = logger
        thread = PThread(name: "src-rdma-cm") { [self] in eventLoop() }
        logger.info("RDMA: listening on \(host) port \(bound), \(length) bytes of guest RAM registered for remote READ only")
    }

    /// A fresh one-time token for `session` and where to READ. Called only on an
    /// authenticated control connection, after the guest paused.
    public func offer(session: UInt64) -> RDMAOffer {
        var rng = SystemRandomNumberGenerator()
        let token = (0..<RDMAOffer.tokenBytes).map { _ in UInt8.random(in: 0...255, using: &rng) }
        tokens.withLock { $0[token] = session }
        return RDMAOffer(port: port, token: token, remoteAddress: base, length: length, rkey: rkey)
    }

    /// Forgets the tokens of a finished session.
    public func endSession(_ session: UInt64) {
        tokens.withLock { t in t = t.filter { $0.value != session } }
    }

    /// Longest wait of the event thread for an rdma_cm event or the stop eventfd (ms).
    static let eventPollTimeoutMs: Int32 = 1000

    private func eventLoop() {
        let fd = crdma_listener_fd(listener)
        var ev = crdma_event()
        while true {
            let r = cpc_poll2(fd, stopFD.fd.raw, Self.eventPollTimeoutMs)
            if r & 2 != 0 { return }
            while true {
                let got = crdma_listener_next(listener, &ev)
                if got <= 0 {
                    if got < 0 { logger.error("RDMA: rdma_get_cm_event: \(String(cString: strerror(-got)))") }
                    break
                }
                handle(ev)
            }
        }
    }

    private func handle(_ ev: crdma_event) {
        guard let id = ev.id else { return }
        switch Int(ev.kind) {
        case Int(CRDMA_EV_CONNECT_REQUEST):
            let priv = withUnsafeBytes(of: ev.priv) { Array($0.prefix(Int(ev.priv_len))) }
            let token = Array(priv.prefix(RDMAOffer.tokenBytes))
            guard priv.count >= RDMAConnectData.length, !refuseNewConnections.load(ordering: .relaxed),
                  let session = tokens.withLock({ $0[token] }) else {
                rejectedConnections.add(1, ordering: .relaxed)
                let why = refuseNewConnections.load(ordering: .relaxed) ? "new RDMA connections are refused" : "no valid token"
                logger.warning("RDMA: refusing a connect request: \(why)")
                crdma_listener_reject(id)
                return
            }
            var err = [CChar](repeating: 0, count: 256)
            if crdma_listener_accept(listener, id, &err, err.count) != 0 {
                logger.error("RDMA: accepting a connection of session \(session): \(errorText(err))")
                crdma_listener_release(id)
                return
            }
            lock.withLock { _ = connections.insert(id) }
            acceptedConnections.add(1, ordering: .relaxed)
            logger.info("RDMA: \(priv[RDMAOffer.tokenBytes] == 1 ? "demand" : "background") QP of session \(session) connected")
        case Int(CRDMA_EV_DISCONNECTED):
            let known = lock.withLock { connections.remove(id) != nil }
            if known {
                crdma_listener_release(id)
                logger.debug("RDMA: a QP disconnected")
            }
        case Int(CRDMA_EV_ESTABLISHED):
            break
        default:
            // A connect that failed after we accepted it (timeout, reject by peer).
            let known = lock.withLock { connections.remove(id) != nil }
            logger.debug("RDMA: cm event \(ev.cm_event) status \(ev.status)")
            if known { crdma_listener_release(id) }
        }
    }

    /// Tears every QP down (their READs fail with a flush or retry error at the
    /// destination): failover tests.
    @_spi(Testing) public func disconnectAll() {
        let ids = lock.withLock { connections }
        for id in ids { crdma_listener_disconnect(id) }
    }

    /// Stops the event thread, disconnects and frees every QP, deregisters RAM,
    /// destroys the listener: reverse order of setup.
    public func stop() {
        guard let t = thread else { return }
        thread = nil
        stopFD.signal()
        t.join()
        let ids = lock.withLock { () -> Set<UnsafeMutableRawPointer> in
            let c = connections
            connections = []
            return c
        }
        for id in ids {
            crdma_listener_disconnect(id)
            crdma_listener_release(id)
        }
        if let mr { crdma_dereg(mr) }
        mr = nil
        crdma_listener_destroy(listener)
    }

    deinit { stop() }
}

extension RDMAServer: RemoteReadProvider {
    public var acceptedConnectionCount: UInt64 { acceptedConnections.load(ordering: .relaxed) }
}
