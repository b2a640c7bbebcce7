import CPostcopy
import PostcopyCore
import PostcopyTransport
import PostcopyWire
#if canImport(Glibc)
import Glibc
#endif

/// One page channel being served: its connection, the session it joined, and
/// whether it is the session's main (control + background) or urgent channel.
struct ServedChannel {
    let conn: any FrameConnection
    let session: SourceSession
    let role: ChannelRole
}

/// What a message handler tells the dispatch loop.
enum ChannelFlow {
    /// Go on with the next frame.
    case next
    /// Stop serving this channel (the server stops or the peer left); no error.
    case end
}

extension PageServer {
    /// The handshake (hello, authentication, session), the welcome, then every
    /// frame of the channel, each to its handler.
    func serveChannel(_ conn: any FrameConnection) throws(TransportError) {
        let first = try conn.receive(timeoutMs: WireProtocol.handshakeTimeoutMs)
        guard case .hello(let hello) = first else {
            throw .protocolViolation("first frame must be hello, got \(first.type)")
        }
        if let key = authKey {
            guard try authenticate(conn, hello: hello, key: key) else { return }
        }
        guard let session = try join(conn, hello: hello) else { return }
        if hello.role == .main {
            backgroundPriority.applyToCurrentThread()
        }
        let pageSize = memory.table.pageSize
        conn.pageSize = pageSize
        // Digest and device-state size are known here only once the guest paused
        // and RAM was scanned; 0 means "not yet" (the replies to the later
        // requests carry them).
        let scan = memory.scanIfDone
        try conn.send(.welcome(Welcome(pageSize: UInt32(pageSize), sessionID: session.id,
                                       capabilities: offeredCapabilities, regions: memory.table.regions,
                                       digest: scan?.digest ?? 0,
                                       deviceStateSize: UInt64(memory.waitForDeviceState(timeoutMs: 0)?.count ?? 0))))
        logger.info("\(hello.role) channel from \(conn.peer) joined session \(session.id)")
        if hello.role == .main {
            // How long a destination copying in precopy is away is timed from here.
            precopy?.mainChannel(session: session.id, connected: true)
        }
        defer { if hello.role == .main { precopy?.mainChannel(session: session.id, connected: false) } }
        try dispatch(ServedChannel(conn: conn, session: session, role: hello.role))
    }

    /// What the welcome says this source does.
    var offeredCapabilities: Capabilities {
        var c: Capabilities = [.zeroMap, .urgentChannel, .gather]
        if precopy?.offered == true { c.formUnion([.precopy, .precopyGather]) }
        if authKey != nil { c.insert(.authentication) }
        if encrypted { c.insert(.encryption) }
        return c
    }

    /// The session a hello asks for: a new one (main, id 0), the one a
    /// reconnecting main or an urgent channel names, or nil after telling the
    /// peer it is unknown.
    private func join(_ conn: any FrameConnection, hello: Hello) throws(TransportError) -> SourceSession? {
        switch hello.role {
        case .main where hello.sessionID != 0:
            // A destination reconnecting after a cut: the session (and what was
            // sent in it) goes on; the destination re-requests what it lacks.
            guard let s = sessions.session(hello.sessionID) else {
                try refuseUnknownSession(conn, "unknown or completed session \(hello.sessionID)")
                return nil
            }
            stats.resumedSessions.add(1, ordering: .relaxed)
            return s
        case .main:
            return sessions.open(pages: memory.table.totalPages)
        case .urgent:
            guard let s = sessions.session(hello.sessionID) else {
                try refuseUnknownSession(conn, "unknown session \(hello.sessionID)")
                return nil
            }
            return s
        }
    }

    private func refuseUnknownSession(_ conn: any FrameConnection, _ why: String) throws(TransportError) {
        stats.rejectedConnections.add(1, ordering: .relaxed)
        try conn.send(.error(ErrorMessage(code: .unknownSession, message: why)))
    }

    /// Every frame of the channel to its handler, until one ends the channel.
    private func dispatch(_ channel: ServedChannel) throws(TransportError) {
        let conn = channel.conn
        // Requests are small: take every one that is there, answer them in one send.
        conn.readAhead = true
        var next: Message?
        // Main channel: frames already there wait here, so that a prefetch
        // asked for after a few stream gathers goes out before them.
        var queued = FrameQueue()
        while true {
            let m: Message
            if channel.role == .main {
                // A frame read on the way is the next one in order.
                if let n = next { queued.pushFront(n) }
                next = nil
                m = try queued.next(conn)
            } else if let n = next {
                m = n
                next = nil
            } else {
                m = try conn.receive(timeoutMs: -1)
            }
            let flow: ChannelFlow
            switch m {
            case .pageRequest(let r):
                next = try channel.role == .main ? handlePageRequests(first: r, channel) { () throws(TransportError) in try queued.more(conn) }
                    : handlePageRequests(first: r, channel) { () throws(TransportError) in try conn.tryReceiveMore() }
                flow = .next
            case .gatherRequest(let g):
                try serveGather(g, channel)
                flow = .next
            case .zeroMapRequest(let z):
                try conn.send(.zeroMap(try zeroMap(z)))
                flow = .next
            case .deviceStateRequest(let d):
                flow = try handleDeviceStateRequest(d, channel)
            case .pageDigestRequest(let r):
                flow = try handlePageDigestRequest(r, channel)
            case .rdmaRequest:
                flow = try handleRemoteReadRequest(channel)
            case .precopyPassRequest(let p):
                flow = try handlePrecopyPass(p, channel)
            case .complete(let c):
                try handleComplete(c, channel)
                flow = .next
            default:
                throw .protocolViolation("unexpected \(m.type) from destination")
            }
            if case .end = flow { return }
        }
    }

    /// How often the waits for the pause and the scan look at the stop flag (ms).
    static let freezePollIntervalMs = 200

    /// Waits for the pause; false when the server stops first.
    func waitForFreeze() -> Bool {
        while !stopping.load(ordering: .relaxed) {
            if memory.waitForDeviceState(timeoutMs: Self.freezePollIntervalMs) != nil { return true }
        }
        return false
    }

    /// The RAM scan (after the pause); nil when the server stops first.
    /// `urgently`: start the digests now; otherwise they start when every page
    /// was sent, or once no page was served for `idleBeforeDigestsMs` (a
    /// destination that fetches over RDMA, or none at all).
    func waitForScan(urgently: Bool = true) -> MemoryScan? {
        while !stopping.load(ordering: .relaxed) {
            let wanting = urgently || memory.idleNanoseconds > Self.idleBeforeDigestsMs * 1_000_000
            if let s = memory.waitForScan(timeoutMs: Self.freezePollIntervalMs, wanting: wanting) { return s }
        }
        return nil
    }

    /// See `waitForScan(urgently:)`.
    static let idleBeforeDigestsMs: UInt64 = 500

    /// Waits for the guest to pause; nil when the server stops or the peer leaves first.
    func waitUntilFrozen(_ conn: any FrameConnection) -> [UInt8]? {
        while !stopping.load(ordering: .relaxed) {
            if let s = memory.waitForDeviceState(timeoutMs: Self.freezePollIntervalMs) { return s }
            if !peerWaits(conn) { return nil }
        }
        return nil
    }

    /// Waits until `channel`'s session may READ guest RAM remotely: the guest
    /// paused, or the session copies it in precopy passes. False when the
    /// server stops or the peer leaves first.
    func waitUntilReadable(_ channel: ServedChannel) -> Bool {
        while !stopping.load(ordering: .relaxed) {
            if precopy?.mayServe(session: channel.session.id) == true { return true }
            if memory.waitForDeviceState(timeoutMs: Self.freezePollIntervalMs) != nil { return true }
            if !peerWaits(channel.conn) { return false }
        }
        return false
    }

    /// False when the server stops or the peer hung up while waiting for an
    /// answer (a peer that hung up is not worth waiting for).
    func peerWaits(_ conn: any FrameConnection) -> Bool {
        if stopping.load(ordering: .relaxed) { return false }
        return !(cpc_poll1(conn.pollDescriptor, Int16(POLLIN), 0) > 0 && (try? conn.tryReceive()) == nil)
    }
}
