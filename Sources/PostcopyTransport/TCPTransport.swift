import PostcopyCore
import PostcopyWire
import Synchronization

/// The TCP transport: a `.main` connection for control and background pages and
/// an `.urgent` connection for demand pages (QEMU's postcopy-preempt idea), so a
/// demand reply never waits behind a background batch in a socket buffer.
public final class TCPTransport: Transport, @unchecked Sendable {
    public let name = "tcp"
    /// Largest demand (plus prefetch) request the urgent channel carries.
    public let maxDemandPages: Int
    public let endpoint: Endpoint
    private let maxBatchPages: Int
    /// Guards `main`, `channels`, `retired`: a reconnect (on one engine thread)
    /// replaces them while another thread may start a control call.
    private let lock = NSLockLite()
    private var main: TCPConnection?
    private var info: SessionInfo?
    private var channels: [TCPPageChannel] = []
    /// What this transport's connections moved: on the wire, and through the cipher.
    private struct ByteTotals {
        var sent: UInt64 = 0, received: UInt64 = 0, encrypted: UInt64 = 0, decrypted: UInt64 = 0
    }
    /// Totals of connections closed by reconnects (still part of the totals).
    private var retired = ByteTotals()

    /// Shared key; when set, the source must prove it and this side proves it too.
    private let authKey: [UInt8]?
    /// Whether frames after the authentication are encrypted (only with a key).
    public let encrypted: Bool

    public init(endpoint: Endpoint, maxBatchPages: Int, maxDemandPages: Int = 64, authKey: [UInt8]? = nil, encryption: StreamEncryption = .on) {
        self.authKey = authKey
        encrypted = encryption.applies(withKey: authKey)
        self.endpoint = endpoint
        self.maxBatchPages = maxBatchPages
        self.maxDemandPages = maxDemandPages
    }

    /// Largest frame the handshake may bring (a region table of up to 1024 named regions).
    static let handshakeMaxBody = 1 << 20

    private func handshake(_ role: ChannelRole, sessionID: UInt64) throws(TransportError) -> (TCPConnection, Welcome) {
        let c = try TCPConnection.connect(endpoint, maxBody: Self.handshakeMaxBody)
        let nonce = authKey.map { _ in Authentication.nonce() }
        var asked: Capabilities = [.zeroMap, .urgentChannel]
        if nonce != nil { asked.insert(.authentication) }
        if encrypted { asked.insert(.encryption) }
        try c.send(.hello(Hello(role: role, capabilities: asked,
                                sessionID: sessionID,
                                extensions: nonce.map { [HandshakeExtension(type: ExtensionType.clientNonce, value: $0)] } ?? [])))
        var reply = try c.receive(timeoutMs: WireProtocol.handshakeTimeoutMs)
        if case .authChallenge(let challenge) = reply {
            guard let authKey, let nonce else {
                throw .unavailable("the source at \(endpoint) requires authentication: give the shared key with --key-file")
            }
            guard Authentication.equal(challenge.proof, Authentication.sourceProof(key: authKey, clientNonce: nonce, serverNonce: challenge.serverNonce)) else {
                throw .protocolViolation("the source at \(endpoint) could not prove the shared key; refusing it")
            }
            try c.send(.authResponse(AuthResponse(proof: Authentication.destinationProof(key: authKey, clientNonce: nonce, serverNonce: challenge.serverNonce))))
            if encrypted {
                // The welcome and everything after it, both ways, in AES-256-GCM records.
                try c.startEncryption(StreamKeys(sharedKey: authKey, clientNonce: nonce, serverNonce: challenge.serverNonce, isSource: false))
            }
            reply = try c.receive(timeoutMs: WireProtocol.handshakeTimeoutMs)
        } else if authKey != nil {
            throw .protocolViolation("the source at \(endpoint) did not authenticate; refusing to take pages from it")
        }
        guard case .welcome(let w) = reply else { throw .protocolViolation("expected welcome, got \(reply.type)") }
        c.pageSize = Int(w.pageSize)
        // From now on a frame is at most one batch of pages (or a 1 MiB control chunk).
        let pages = role == .urgent ? maxDemandPages : maxBatchPages
        // (A gather reply carries its runs too.)
        c.setMaxBody(max(Self.handshakeMaxBody, PageDataHeader.encodedSize + pages * Int(w.pageSize)) + Self.gatherHeadMax)
        return (c, w)
    }

    /// The largest gather reply's bytes before its pages.
    static let gatherHeadMax = GatherData.fixedSize + WireProtocol.maxGatherRuns * GatherRun.encodedSize

    public func connect() throws(TransportError) -> SessionInfo {
        let (c, w) = try handshake(.main, sessionID: 0)
        lock.withLock { main = c }
        let i = SessionInfo(welcome: w)
        info = i
        return i
    }

    public func openChannel(_ kind: ChannelKind) throws(TransportError) -> PageChannel {
        guard let info, let main = lock.withLock({ main }) else { throw .protocolViolation("openChannel before connect") }
        let ch: TCPPageChannel
        switch kind {
        case .background:
            ch = TCPPageChannel(connection: main, table: info.table, capabilities: info.welcome.capabilities)
        case .demand:
            let (c, w) = try handshake(.urgent, sessionID: info.welcome.sessionID)
            guard w.sessionID == info.welcome.sessionID, w.regions == info.welcome.regions else {
                throw .protocolViolation("urgent channel joined a different session")
            }
            ch = TCPPageChannel(connection: c, table: info.table, capabilities: w.capabilities)
        }
        lock.withLock { channels.append(ch) }
        return ch
    }

    private func control(_ m: Message, timeoutMs: Int32 = WireProtocol.controlReplyTimeoutMs) throws(TransportError) -> Message {
        guard let main = lock.withLock({ main }) else {
            // Connected once, then a reconnect failed part-way (it drops the old
            // connection first): a lost connection, which the caller retries.
            if info != nil { throw .closed("\(endpoint): not connected (a reconnect is under way or failed)") }
            throw .protocolViolation("control call before connect")
        }
        try main.send(m)
        return try main.receive(timeoutMs: timeoutMs)
    }

    public func fetchZeroMap(region: UInt16, firstPage: UInt64, pageCount: UInt64) throws(TransportError) -> ZeroMap {
        // Answered once the source guest paused and RAM was scanned: no timeout.
        let r = try control(.zeroMapRequest(ZeroMapRequest(region: region, firstPage: firstPage, pageCount: pageCount)), timeoutMs: -1)
        guard case .zeroMap(let z) = r, z.region == region, z.firstPage == firstPage, z.pageCount == pageCount else {
            throw .protocolViolation("zero map reply does not match the request")
        }
        return z
    }

    public func fetchDeviceState(timeoutMs: Int32) throws(TransportError) -> [UInt8] {
        var out: [UInt8] = []
        var total: UInt64 = 1
        var first = true
        while UInt64(out.count) < total {
            let r = try control(.deviceStateRequest(DeviceStateRequest(offset: UInt64(out.count), maxLength: UInt32(WireProtocol.maxDeviceStateChunk))),
                                timeoutMs: first ? timeoutMs : WireProtocol.controlReplyTimeoutMs)
            guard case .deviceState(let d) = r, d.offset == UInt64(out.count), first || d.totalSize == total,
                  !d.data.isEmpty || d.totalSize == 0 else {
                throw .protocolViolation("device state reply does not match the request")
            }
            total = d.totalSize
            first = false
            out += d.data
        }
        return out
    }

    public func fetchPageDigests(region: UInt16, firstPage: UInt64, pageCount: UInt32) throws(TransportError) -> [UInt64] {
        let r = try control(.pageDigestRequest(PageDigestRequest(region: region, firstPage: firstPage, pageCount: pageCount)))
        guard case .pageDigests(let d) = r, d.region == region, d.firstPage == firstPage, d.digests.count == Int(pageCount) else {
            throw .protocolViolation("page digest reply does not match the request")
        }
        return d.digests
    }

    public func fetchDirtySet(pass: UInt32) throws(TransportError) -> PrecopySet {
        guard let info else { throw .protocolViolation("precopy before connect") }
        guard let main = lock.withLock({ main }) else { throw .closed("\(endpoint): not connected (a reconnect is under way or failed)") }
        try main.send(.precopyPassRequest(PrecopyPassRequest(pass: pass)))
        // The first chunk comes when the source decided (it may wait for its
        // operator, then for its guest's pause): no timeout.
        var first = true
        return try PrecopySet.receive(pass: pass, totalPages: info.table.totalPages) { () throws(TransportError) in
            defer { first = false }
            return try main.receive(timeoutMs: first ? -1 : WireProtocol.controlReplyTimeoutMs)
        }
    }

    public func complete(_ c: Complete) throws(TransportError) -> CompleteAck {
        let r = try control(.complete(c))
        guard case .completeAck(let a) = r else { throw .protocolViolation("expected completeAck, got \(r.type)") }
        return a
    }

    /// Asks the source for RDMA access to its RAM (answered once its guest
    /// paused; an error frame when the source serves no RDMA).
    public func requestRDMAOffer() throws(TransportError) -> RDMAOffer {
        let r = try control(.rdmaRequest(RDMARequest()), timeoutMs: -1)
        switch r {
        case .rdmaOffer(let o): return o
        case .error(let e): throw .peer(e)
        default: throw .protocolViolation("expected rdmaOffer, got \(r.type)")
        }
    }

    public func reconnect() throws(TransportError) -> (demand: PageChannel, background: PageChannel) {
        guard let info else { throw .protocolViolation("reconnect before connect") }
        let old = totals
        // Shut down, not close: a thread may still be inside a call on an old
        // connection, and a closed fd number could be reused by the new one.
        // The old descriptors close when their last user lets go of them.
        close()
        lock.withLock {
            retired = old
            channels = []
            main = nil
        }
        let (c, w) = try handshake(.main, sessionID: info.welcome.sessionID)
        guard w.sessionID == info.welcome.sessionID, w.regions == info.welcome.regions else {
            c.close()
            throw .protocolViolation("the source answered the reconnect with another session")
        }
        lock.withLock { main = c }
        return (try openChannel(.demand), try openChannel(.background))
    }

    /// The totals of every connection so far, closed ones included (each
    /// connection once: the main one is also the background channel's).
    private var totals: ByteTotals {
        let (retired, channels, main) = lock.withLock { (self.retired, self.channels, self.main) }
        var t = retired
        var conns = channels.map { $0.connection }
        if let main { conns.append(main) }
        var seen = Set<ObjectIdentifier>()
        for c in conns where seen.insert(ObjectIdentifier(c)).inserted {
            t.sent += c.bytesSent
            t.received += c.bytesReceived
            t.encrypted += c.bytesEncrypted
            t.decrypted += c.bytesDecrypted
        }
        return t
    }

    public var bytesOnWire: (sent: UInt64, received: UInt64) {
        let t = totals
        return (t.sent, t.received)
    }

    /// Frame bytes encrypted (sent) and decrypted (received) so far: 0 when not encrypted.
    public var bytesThroughCipher: (encrypted: UInt64, decrypted: UInt64) {
        let t = totals
        return (t.encrypted, t.decrypted)
    }

    public func close() {
        let (channels, main) = lock.withLock { (self.channels, self.main) }
        for c in channels { c.connection.shutdown() }
        main?.shutdown()
    }
}
