import CRDMA
import Logging
import PostcopyCore
import PostcopyTransport
import PostcopyWire
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// How many RDMA devices libibverbs sees here (`ibv_get_device_list`).
public func rdmaDeviceCount() -> Int { Int(crdma_device_count()) }

/// The RDMA transport. Control (handshake, authentication, zero map, device
/// state, completion) stays on an authenticated TCP connection to the source;
/// only after that handshake, and once the guest paused, does the source hand
/// out the address and rkey of its RAM (registered for remote READ only) and a
/// one-time token. Each page channel is then its own rdma_cm connection (an RC
/// QP) presenting that token, and pages move by one-sided RDMA READ.
///
/// When RDMA breaks mid-migration (QP in error, device gone), `reconnect`
/// rejoins the session over TCP and tries RDMA again once; if that fails the
/// migration goes on over TCP channels (failover), without pausing the guest
/// beyond the reconnect.
public final class RDMATransport: Transport, @unchecked Sendable {
    public var name: String { lock.withLock { usingTCPFallback } ? "rdma→tcp" : "rdma" }
    public let endpoint: Endpoint
    private let tcp: TCPTransport
    private let maxBatchPages: Int
    private let connectTimeoutMs: Int32
    private let logger: Logger?
    private let lock = NSLockLite()
    private var info: SessionInfo?
    private var offer: RDMAOffer?
    private var channels: [RDMAPageChannel] = []
    private var retiredReceived: UInt64 = 0
    private var usingTCPFallback = false
    /// Set once a reconnect had to fall back to TCP.
    public var failedOver: Bool { lock.withLock { usingTCPFallback } }

    /// `auto`: when the first channel cannot be had over RDMA (the source offers
    /// none, no route from a local device), use TCP for the whole migration.
    private let fallBackToTCP: Bool
    /// What `auto` decided and why, once the first channel is open.
    public var decision: String? { lock.withLock { decisionText } }
    private var decisionText: String?

    /// How long rdma_cm address/route resolution and the connect may take (ms).
    public static let defaultConnectTimeoutMs: Int32 = 10_000

    /// `encryption` covers the TCP control connection (and the TCP page channels
    /// of a failover); pages READ by the NIC cross the fabric in clear.
    public init(endpoint: Endpoint, maxBatchPages: Int, maxDemandPages: Int = 64, authKey: [UInt8]? = nil,
                encryption: StreamEncryption = .on, fallBackToTCP: Bool = false,
                connectTimeoutMs: Int32 = RDMATransport.defaultConnectTimeoutMs, logger: Logger? = nil) {
        self.fallBackToTCP = fallBackToTCP
        self.endpoint = endpoint
        self.maxBatchPages = maxBatchPages
        self.connectTimeoutMs = connectTimeoutMs
        self.logger = logger
        tcp = TCPTransport(endpoint: endpoint, maxBatchPages: maxBatchPages, maxDemandPages: maxDemandPages, authKey: authKey, encryption: encryption)
    }

    public func connect() throws(TransportError) -> SessionInfo {
        let i = try tcp.connect()
        lock.withLock { info = i }
        return i
    }

    /// Over the TCP control connection; the pages of a pass are READ.
    public func fetchDirtySet(pass: UInt32) throws(TransportError) -> PrecopySet {
        try tcp.fetchDirtySet(pass: pass)
    }

    /// The source's RAM address, length and rkey (asked for once per connection).
    public func rdmaOffer() throws(TransportError) -> RDMAOffer {
        if let o = lock.withLock({ offer }) { return o }
        let o = try tcp.requestRDMAOffer()
        lock.withLock { offer = o }
        return o
    }

    public func openChannel(_ kind: ChannelKind) throws(TransportError) -> PageChannel {
        if lock.withLock({ usingTCPFallback }) { return try tcp.openChannel(kind) }
        do {
            let ch = try openRDMAChannel(kind)
            lock.withLock { if decisionText == nil { decisionText = "using RDMA (one-sided READ from \(endpoint.host))" } }
            return ch
        } catch {
            guard fallBackToTCP, lock.withLock({ channels.isEmpty }) else { throw error }
            let why = "auto: using TCP because RDMA is not possible with this source: \(error)"
            lock.withLock {
                usingTCPFallback = true
                decisionText = why
            }
            logger?.notice("\(why)")
            return try tcp.openChannel(kind)
        }
    }

    /// An RDMA channel of `kind` (never a TCP one), for tests and `openChannel`.
    public func openRDMAChannel(_ kind: ChannelKind) throws(TransportError) -> RDMAPageChannel {
        try openRDMAChannel(kind, offer: nil)
    }

    /// Fault injection: an RDMA channel that presents `forgedOffer` (another
    /// token or rkey than the source gave) instead of the source's offer.
    @_spi(Testing) public func openRDMAChannel(_ kind: ChannelKind, forgedOffer: RDMAOffer) throws(TransportError) -> RDMAPageChannel {
        try openRDMAChannel(kind, offer: forgedOffer)
    }

    private func openRDMAChannel(_ kind: ChannelKind, offer forged: RDMAOffer?) throws(TransportError) -> RDMAPageChannel {
        guard let info = lock.withLock({ info }) else { throw .protocolViolation("openChannel before connect") }
        let o: RDMAOffer
        if let forged { o = forged } else { o = try rdmaOffer() }
        let priv = RDMAConnectData.encode(token: o.token, kind: kind)
        var conn: OpaquePointer?
        var err = [CChar](repeating: 0, count: 256)
        let maxWR = kind == .demand ? 128 : 32
        let rc = priv.withUnsafeBytes { p in
            crdma_connect(endpoint.host, String(o.port), p.baseAddress, UInt8(p.count), connectTimeoutMs, UInt32(maxWR),
                          kind == .demand ? 1 : 0, &conn, &err, err.count)
        }
        guard rc == 0, let conn else {
            let why = errorText(err)
            if rc == -ECONNREFUSED { throw .peer(ErrorMessage(code: .authenticationFailed, message: "the source refused the RDMA connection (\(why))")) }
            throw .unavailable("RDMA connect to \(endpoint.host) port \(o.port): \(why)")
        }
        let depth = Int(crdma_conn_read_depth(conn))
        let ch = try RDMAPageChannel(conn: conn, offer: o, table: info.table, kind: kind,
                                     maxOutstanding: min(maxWR, max(depth, 1) * 4))
        lock.withLock {
            channels.append(ch)
            if watcher == nil { watcher = PThread(name: "rdma-cm-watch") { [self] in watchLoop() } }
        }
        return ch
    }

    public func fetchZeroMap(region: UInt16, firstPage: UInt64, pageCount: UInt64) throws(TransportError) -> ZeroMap {
        try tcp.fetchZeroMap(region: region, firstPage: firstPage, pageCount: pageCount)
    }

    public func fetchDeviceState(timeoutMs: Int32) throws(TransportError) -> [UInt8] {
        try tcp.fetchDeviceState(timeoutMs: timeoutMs)
    }

    public func fetchPageDigests(region: UInt16, firstPage: UInt64, pageCount: UInt32) throws(TransportError) -> [UInt64] {
        try tcp.fetchPageDigests(region: region, firstPage: firstPage, pageCount: pageCount)
    }

    public func complete(_ c: Complete) throws(TransportError) -> CompleteAck {
        try tcp.complete(c)
    }

    /// Rejoins the session over TCP (re-authenticating), then tries RDMA once
    /// more with a fresh token; when RDMA cannot be had, continues over TCP.
    public func reconnect() throws(TransportError) -> (demand: PageChannel, background: PageChannel) {
        let old = lock.withLock { () -> [RDMAPageChannel] in
            let o = channels
            channels = []
            offer = nil
            for c in o { retiredReceived += c.bytesReceived }
            return o
        }
        // Other engine threads may still wait on the old QPs: break them (their
        // READs flush and wake them) rather than free them under their feet.
        for c in old { c.retire() }
        let tcpChannels = try tcp.reconnect()
        if lock.withLock({ usingTCPFallback }) { return tcpChannels }
        do {
            let d = try openRDMAChannel(.demand)
            let b = try openRDMAChannel(.background)
            return (d, b)
        } catch {
            lock.withLock {
                usingTCPFallback = true
                for c in channels { retiredReceived += c.bytesReceived; c.retire() }
                channels = []
            }
            logger?.warning("RDMA unavailable after the failure (\(error)); continuing the migration over TCP")
            return tcpChannels
        }
    }

    /// The TCP control connection's (and a failover's page channels'): pages
    /// READ by the NIC are never encrypted.
    public var encrypted: Bool { tcp.encrypted }
    public var bytesThroughCipher: (encrypted: UInt64, decrypted: UInt64) { tcp.bytesThroughCipher }

    public var bytesOnWire: (sent: UInt64, received: UInt64) {
        let t = tcp.bytesOnWire
        let r = lock.withLock { channels.reduce(retiredReceived) { $0 + $1.bytesReceived } }
        return (t.sent, t.received + r)
    }

    public func close() {
        tcp.close()
        let (chs, w) = lock.withLock { () -> ([RDMAPageChannel], PThread?) in
            let w = watcher
            watcher = nil
            return (channels, w)
        }
        for c in chs { c.retire() }
        watcherStop.store(true, ordering: .relaxed)
        w?.join()
    }

    private var watcher: PThread?
    private let watcherStop = Atomic<Bool>(false)

    /// Watches the channels' rdma_cm events: a peer that disconnects a QP (the
    /// source stopping RDMA, its device going away) retires the channel at once,
    /// so the engine reconnects (or fails over to TCP) without waiting for READ
    /// retries to run out.
    private func watchLoop() {
        while !watcherStop.load(ordering: .relaxed) {
            for c in lock.withLock({ channels }) where c.checkDisconnected() {
                logger?.warning("RDMA: the source disconnected a queue pair")
            }
            usleep(Self.watchIntervalUs)
        }
    }

    /// How often the watcher looks for disconnected queue pairs (µs).
    static let watchIntervalUs: UInt32 = 50_000
}

/// The NUL-terminated message a C shim call left in `buffer`.
func errorText(_ buffer: [CChar]) -> String {
    buffer.withUnsafeBufferPointer { String(cString: $0.baseAddress!) }
}
