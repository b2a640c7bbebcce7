import CPostcopy
import Logging
import PostcopyCore
import PostcopyRDMA
import PostcopyTransport
import PostcopyWire
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// Counters of one source, readable while it serves.
public final class SourceStats: Sendable {
    public let demandPages = Atomic<UInt64>(0)
    public let prefetchPages = Atomic<UInt64>(0)
    public let backgroundPages = Atomic<UInt64>(0)
    public let zeroReplies = Atomic<UInt64>(0)
    public let pagesSentTwice = Atomic<UInt64>(0)
    public let bytesSent = Atomic<UInt64>(0)
    public let bytesReceived = Atomic<UInt64>(0)
    public let rejectedConnections = Atomic<UInt64>(0)
    public let completedSessions = Atomic<UInt64>(0)
    /// Main connections that resumed an existing session (a destination reconnecting).
    public let resumedSessions = Atomic<UInt64>(0)
    public let lastDigestMatched = Atomic<Bool>(false)
}

/// One migration session: the pages already sent (each page goes out once per
/// session; a second send is counted, never silent).
final class SourceSession: Sendable {
    let id: UInt64
    private let sent: Locked<[UInt64]>

    init(id: UInt64, pages: Int) {
        self.id = id
        sent = Locked([UInt64](repeating: 0, count: (pages + 63) / 64))
    }

    /// Marks pages sent; returns how many had been sent before.
    func markSent(globalFirst: Int, count: Int) -> Int {
        sent.withLock { bits in
            var dup = 0
            for p in globalFirst..<(globalFirst + count) {
                let m: UInt64 = 1 << UInt64(p & 63)
                if bits[p >> 6] & m != 0 { dup += 1 } else { bits[p >> 6] |= m }
            }
            return dup
        }
    }
}

/// The source page server. Each accepted connection gets its own thread, so a
/// demand reply (urgent connection) never waits behind a background batch being
/// written on the main connection; the main connection's thread runs at
/// `backgroundPriority`.
public final class PageServer: Sendable {
    public let memory: SourceMemory
    public let stats = SourceStats()
    public let logger: Logger
    public let exitAfterCompletion: Bool
    /// Priority of the thread serving a main connection (control + background batches).
    public let backgroundPriority: ThreadPriority
    private let listener: TCPListener
    private let sessions = Locked<[UInt64: SourceSession]>([:])
    private let connections = Locked<[ObjectIdentifier: TCPConnection]>([:])
    private let acceptThread = Locked<PThread?>(nil)
    private let threads = Locked<[PThread]>([])
    private let done: EventFD
    private let stopping = Atomic<Bool>(false)

    public var port: Int { listener.port }

    /// Shared key: when set, a peer must prove it (and this source proves it)
    /// before it learns anything but an error.
    public let authKey: [UInt8]?

    /// RDMA access to guest RAM, offered on authenticated main connections once
    /// the guest paused; nil = TCP only.
    public let rdma: RDMAServer?

    public init(memory: SourceMemory, listen endpoint: Endpoint, exitAfterCompletion: Bool,
                backgroundPriority: ThreadPriority = .normal, authKey: [UInt8]? = nil, rdma: RDMAServer? = nil,
                logger: Logger) throws(TransportError) {
        self.rdma = rdma
        self.authKey = authKey
        self.memory = memory
        self.backgroundPriority = backgroundPriority
        self.logger = logger
        self.exitAfterCompletion = exitAfterCompletion
        listener = try TCPListener(endpoint)
        do { done = try EventFD() } catch { throw .system(error) }
    }

    /// Starts the accept thread.
    public func start() {
        let t = PThread(name: "src-accept") { [self] in acceptLoop() }
        acceptThread.withLock { $0 = t }
    }

    /// Blocks until a session completed (with `exitAfterCompletion`) or `stop()`.
    public func waitUntilDone() {
        while cpc_poll1(done.fd.raw, Int16(POLLIN), 1000) == 0 {}
    }

    /// Blocks until a session completed and every connection has closed (the
    /// destination's VMM and daemon are both done with this source), or `stop()`.
    public func waitUntilCompletedAndIdle() {
        while !stopping.load(ordering: .relaxed) {
            if stats.completedSessions.load(ordering: .relaxed) > 0 && connections.withLock({ $0.isEmpty }) { return }
            usleep(20_000)
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

    private func acceptLoop() {
        let maxBody = 1 << 16
        while !stopping.load(ordering: .relaxed) {
            let conn: TCPConnection?
            do { conn = try listener.accept(maxBody: maxBody) } catch {
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
                connections.withLock { _ = $0.removeValue(forKey: key) }
                conn.close()
            }
            threads.withLock { $0.append(t) }
        }
    }

    /// Serves one connection until it closes. Bad input from the peer gets an
    /// error frame and closes this connection only.
    func serve(_ conn: TCPConnection) {
        do {
            try serveFrames(conn)
        } catch {
            switch error {
            case .closed:
                logger.debug("peer \(conn.peer) closed")
            case .wire(let w):
                stats.rejectedConnections.add(1, ordering: .relaxed)
                logger.warning("closing \(conn.peer): \(w)")
                try? conn.send(.error(ErrorMessage(code: .protocolViolation, message: w.description)))
            case .protocolViolation(let s):
                stats.rejectedConnections.add(1, ordering: .relaxed)
                logger.warning("closing \(conn.peer): \(s)")
                try? conn.send(.error(ErrorMessage(code: .protocolViolation, message: s)))
            default:
                if !stopping.load(ordering: .relaxed) { logger.warning("connection \(conn.peer) failed: \(error)") }
            }
        }
    }

    private func serveFrames(_ conn: TCPConnection) throws(TransportError) {
        let first = try conn.receive(timeoutMs: 30_000)
        guard case .hello(let hello) = first else {
            throw .protocolViolation("first frame must be hello, got \(first.type)")
        }
        if let key = authKey {
            guard try authenticate(conn, hello: hello, key: key) else { return }
        }
        let session: SourceSession
        switch hello.role {
        case .main where hello.sessionID != 0:
            // A destination reconnecting after a cut: the session (and what was
            // sent in it) goes on; the destination re-requests what it lacks.
            guard let s = sessions.withLock({ $0[hello.sessionID] }) else {
                stats.rejectedConnections.add(1, ordering: .relaxed)
                try conn.send(.error(ErrorMessage(code: .unknownSession, message: "unknown or completed session \(hello.sessionID)")))
                return
            }
            session = s
            stats.resumedSessions.add(1, ordering: .relaxed)
        case .main:
            var rng = SystemRandomNumberGenerator()
            session = SourceSession(id: rng.next() | 1, pages: memory.table.totalPages)
            sessions.withLock { $0[session.id] = session }
        case .urgent:
            guard let s = sessions.withLock({ $0[hello.sessionID] }) else {
                stats.rejectedConnections.add(1, ordering: .relaxed)
                try conn.send(.error(ErrorMessage(code: .unknownSession, message: "unknown session \(hello.sessionID)")))
                return
            }
            session = s
        }
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
                                       capabilities: [.zeroMap, .urgentChannel], regions: memory.table.regions,
                                       digest: scan?.digest ?? 0,
                                       deviceStateSize: UInt64(memory.waitForDeviceState(timeoutMs: 0)?.count ?? 0))))
        logger.info("\(hello.role) channel from \(conn.peer) joined session \(session.id)")
        // Requests are small: take every one that is there, answer them in one send.
        conn.readAhead = true
        var next: Message?
        while true {
            let m: Message
            if let n = next { m = n; next = nil } else { m = try conn.receive() }
            switch m {
            case .pageRequest(let r):
                var batch = [r]
                while batch.count < Self.maxRepliesPerSend, let more = try conn.tryReceive() {
                    guard case .pageRequest(let r) = more else { next = more; break }
                    batch.append(r)
                }
                try servePages(batch, conn: conn, session: session)
            case .zeroMapRequest(let z):
                try conn.send(.zeroMap(try zeroMap(z)))
            case .deviceStateRequest(let d):
                // Waits for the pause: a destination VMM asks ahead of time, like QEMU's -incoming.
                guard let state = waitUntilFrozen(conn) else { return }
                let total = UInt64(state.count)
                guard d.offset <= total else { throw .protocolViolation("device state offset \(d.offset) beyond \(total)") }
                let n = Int(min(UInt64(d.maxLength), total - d.offset, 1 << 19))
                let start = Int(d.offset)
                try conn.send(.deviceState(DeviceState(totalSize: total, offset: d.offset, data: Array(state[start..<(start + n)]))))
            case .pageDigestRequest(let r):
                let table = memory.table
                do { try table.validate(region: r.region, pageOffset: r.firstPage, pageCount: UInt64(r.pageCount)) } catch {
                    throw .protocolViolation(error.description)
                }
                guard waitUntilFrozen(conn) != nil, let scan = waitForScan() else { return }
                let first = table.firstGlobalPage[Int(r.region)] + Int(r.firstPage)
                try conn.send(.pageDigests(PageDigests(region: r.region, firstPage: r.firstPage,
                                                       digests: Array(scan.pageDigests[first..<(first + Int(r.pageCount))]))))
            case .rdmaRequest:
                guard hello.role == .main else { throw .protocolViolation("RDMA access asked for on the urgent channel") }
                guard let rdma else {
                    // Not fatal: an `auto` destination goes on over TCP on this connection.
                    try conn.send(.error(ErrorMessage(code: .rdmaUnavailable, message: "this source serves no RDMA (started with --transport tcp, or it has no RDMA device)")))
                    continue
                }
                // RAM is read remotely without us: only once it stopped changing.
                guard waitUntilFrozen(conn) != nil else { return }
                try conn.send(.rdmaOffer(rdma.offer(session: session.id)))
                logger.info("session \(session.id): RDMA access to guest RAM handed to \(conn.peer)")
            case .complete(let c):
                let sourceDigest = waitForScan()?.digest ?? 0
                let matches = c.digest == sourceDigest && c.pagesReceived == UInt64(memory.table.totalPages)
                stats.lastDigestMatched.store(matches, ordering: .relaxed)
                let twice = stats.pagesSentTwice.load(ordering: .relaxed)
                try conn.send(.completeAck(CompleteAck(digestMatches: matches, pagesSentTwice: twice)))
                if let d = c.digest {
                    if matches {
                        logger.info("session \(session.id) complete: destination digest matches")
                    } else {
                        logger.error("session \(session.id) complete but destination digest \(MemoryDigest.hex(d)) != source \(MemoryDigest.hex(sourceDigest))")
                    }
                } else {
                    logger.info("session \(session.id) complete: \(c.pagesReceived) pages in (the destination's VMM checks integrity)")
                }
                stats.completedSessions.add(1, ordering: .relaxed)
                sessions.withLock { _ = $0.removeValue(forKey: session.id) }
                rdma?.endSession(session.id)
                if exitAfterCompletion { done.signal() }
            default:
                throw .protocolViolation("unexpected \(m.type) from destination")
            }
        }
    }

    /// Challenge-response on the shared key (see `Authentication`). False, after
    /// an error frame to the peer, when it fails: the caller closes the connection.
    private func authenticate(_ conn: TCPConnection, hello: Hello, key: [UInt8]) throws(TransportError) -> Bool {
        func refuse(_ why: String) throws(TransportError) -> Bool {
            stats.rejectedConnections.add(1, ordering: .relaxed)
            logger.warning("refusing \(conn.peer): \(why)")
            try conn.send(.error(ErrorMessage(code: .authenticationFailed, message: why)))
            return false
        }
        guard let nonce = hello.extensions.first(where: { $0.type == ExtensionType.clientNonce })?.value,
              nonce.count == Authentication.nonceBytes else {
            return try refuse("this source requires authentication with its shared key")
        }
        let serverNonce = Authentication.nonce()
        try conn.send(.authChallenge(AuthChallenge(serverNonce: serverNonce,
                                                   proof: Authentication.sourceProof(key: key, clientNonce: nonce, serverNonce: serverNonce))))
        let reply = try conn.receive(timeoutMs: 30_000)
        guard case .authResponse(let r) = reply,
              Authentication.equal(r.proof, Authentication.destinationProof(key: key, clientNonce: nonce, serverNonce: serverNonce)) else {
            return try refuse("authentication failed: wrong key")
        }
        return true
    }

    /// The RAM scan (after the pause); nil when the server stops first.
    private func waitForScan() -> MemoryScan? {
        while !stopping.load(ordering: .relaxed) {
            if let s = memory.waitForScan(timeoutMs: 200) { return s }
        }
        return nil
    }

    /// Waits for the guest to pause; nil when the server stops or the peer leaves first.
    private func waitUntilFrozen(_ conn: TCPConnection) -> [UInt8]? {
        while !stopping.load(ordering: .relaxed) {
            if let s = memory.waitForDeviceState(timeoutMs: 200) { return s }
            // A peer that hung up while waiting is not worth waiting for.
            if cpc_poll1(conn.fd.raw, Int16(POLLIN), 0) > 0, (try? conn.tryReceive()) == nil { return nil }
        }
        return nil
    }

    /// Page replies gathered into one sendmsg at most (a burst of demand faults).
    static let maxRepliesPerSend = 64

    /// Answers requests in order, in one vectored send. A request out of range
    /// gets the replies before it, then an error, and the connection closes.
    private func servePages(_ requests: [PageRequest], conn: TCPConnection, session: SourceSession) throws(TransportError) {
        guard memory.isFrozen else {
            throw .protocolViolation("page request before the guest paused (its RAM is still changing)")
        }
        let table = memory.table
        let pageSize = table.pageSize
        let prefixBytes = Protocol.headerSize + PageDataHeader.encodedSize
        var prefixes: [UInt8] = []
        prefixes.reserveCapacity(requests.count * prefixBytes)
        var payloads: [UnsafeRawBufferPointer] = []
        var refused: String?
        for r in requests {
            do {
                try table.validate(region: r.region, pageOffset: r.pageOffset, pageCount: UInt64(r.pageCount))
            } catch {
                refused = error.description
                break
            }
            let global = table.firstGlobalPage[Int(r.region)] + Int(r.pageOffset)
            let count = Int(r.pageCount)
            let allZero = memory.allZero(globalFirst: global, count: count)
            let dup = session.markSent(globalFirst: global, count: count)
            if dup > 0 { stats.pagesSentTwice.add(UInt64(dup), ordering: .relaxed) }
            switch r.pageClass {
            case .demand: stats.demandPages.add(UInt64(count), ordering: .relaxed)
            case .prefetch: stats.prefetchPages.add(UInt64(count), ordering: .relaxed)
            case .background: stats.backgroundPages.add(UInt64(count), ordering: .relaxed)
            }
            let header = PageDataHeader(requestID: r.requestID, region: r.region, pageClass: r.pageClass, isZero: allZero,
                                        pageOffset: r.pageOffset, pageCount: r.pageCount)
            let regionBase = memory.mapping.base + Int(table.regions[Int(r.region)].sourceOffset)
            if allZero { stats.zeroReplies.add(1, ordering: .relaxed) }
            payloads.append(allZero ? UnsafeRawBufferPointer(start: nil, count: 0)
                : UnsafeRawBufferPointer(start: regionBase + Int(r.pageOffset) * pageSize, count: count * pageSize))
            prefixes += Codec.encodePageDataPrefix(header, payloadLength: payloads.last!.count)
        }
        let result: Result<Void, TransportError> = prefixes.withUnsafeBytes { raw in
            var parts: [UnsafeRawBufferPointer] = []
            parts.reserveCapacity(payloads.count * 2)
            for (i, payload) in payloads.enumerated() {
                parts.append(UnsafeRawBufferPointer(rebasing: raw[(i * prefixBytes)..<((i + 1) * prefixBytes)]))
                parts.append(payload)
            }
            return Result { () throws(TransportError) in try conn.sendv(parts) }
        }
        try result.get()
        if let refused {
            stats.rejectedConnections.add(1, ordering: .relaxed)
            try? conn.send(.error(ErrorMessage(code: .outOfRange, message: refused)))
            throw .closed("closed after out-of-range request: \(refused)")
        }
    }

    private func zeroMap(_ z: ZeroMapRequest) throws(TransportError) -> ZeroMap {
        let table = memory.table
        guard z.pageCount >= 1, z.pageCount <= 1 << 22 else {
            throw .protocolViolation("zero map request for \(z.pageCount) pages (1...\(1 << 22) allowed)")
        }
        do {
            try table.validate(region: z.region, pageOffset: z.firstPage, pageCount: z.pageCount)
        } catch { throw .protocolViolation(error.description) }
        guard let scan = waitForScan() else { throw .closed("source stopping") }
        let global = table.firstGlobalPage[Int(z.region)] + Int(z.firstPage)
        var bits = [UInt8](repeating: 0, count: Int((z.pageCount + 7) / 8))
        for i in 0..<Int(z.pageCount) where scan.zeroBits[(global + i) >> 3] & (1 << UInt8((global + i) & 7)) != 0 {
            bits[i >> 3] |= 1 << UInt8(i & 7)
        }
        return ZeroMap(region: z.region, firstPage: z.firstPage, pageCount: z.pageCount, bits: bits)
    }
}
