import PostcopyCore
import PostcopyTransport
import PostcopyWire

extension PageServer {
    /// Page replies gathered into one sendmsg at most (a burst of demand faults).
    static let maxRepliesPerSend = 64

    /// Answers `first` and every page request already there after it (up to
    /// `maxRepliesPerSend`; `more` gives the next frame there, in order) in
    /// one send; returns the other message read on the way, if any, for the
    /// dispatch loop.
    func handlePageRequests(first: PageRequest, _ channel: ServedChannel,
                            more nextFrame: () throws(TransportError) -> Message?) throws(TransportError) -> Message? {
        var batch = [first]
        var next: Message?
        while batch.count < Self.maxRepliesPerSend, let more = try nextFrame() {
            guard case .pageRequest(let r) = more else { next = more; break }
            batch.append(r)
        }
        try servePages(Self.demandFirst(batch), conn: channel.conn, session: channel.session)
        return next
    }

    /// `requests` with the prefetch ones moved behind the others (each part in
    /// its order): a guest waiting on a page never waits behind a prefetch
    /// that arrived with it (replies are matched by id, not by order). The
    /// other classes keep the order they came in.
    public static func demandFirst(_ requests: [PageRequest]) -> [PageRequest] {
        guard let firstPrefetch = requests.firstIndex(where: { $0.pageClass == .prefetch }),
              requests[firstPrefetch...].contains(where: { $0.pageClass != .prefetch }) else { return requests }
        return requests.filter { $0.pageClass != .prefetch } + requests.filter { $0.pageClass == .prefetch }
    }

    /// Answers requests in order, in one vectored send. A request out of range
    /// gets the replies before it, then an error, and the connection closes.
    private func servePages(_ requests: [PageRequest], conn: any FrameConnection, session: SourceSession) throws(TransportError) {
        // Read before any page is: replies flagged paused hold RAM as it is at
        // the pause; precopy replies are flagged as soon as the pause is
        // decided (the destination then stops asking; their pages still wait
        // for the final dirty set).
        let paused = memory.isFrozen
        let precopying = precopy?.mayServe(session: session.id) == true
        let pausing = precopying && precopy?.pausing == true
        if !precopying, let r = requests.first(where: { $0.pageClass == .precopy }) {
            throw .protocolViolation("precopy page request \(r.requestID) outside a precopy pass (none asked for, or the final dirty set was sent)")
        }
        guard paused || requests.allSatisfy({ $0.pageClass == .precopy }) else {
            throw .protocolViolation("page request before the guest paused (its RAM is still changing)")
        }
        let prefixBytes = WireProtocol.headerSize + PageDataHeader.encodedSize
        var prefixes: [UInt8] = []
        prefixes.reserveCapacity(requests.count * prefixBytes)
        var payloads: [UnsafeRawBufferPointer] = []
        var refused: String?
        for r in requests {
            let reply: (header: PageDataHeader, payload: UnsafeRawBufferPointer)
            do {
                reply = try servedPages(r, paused: paused, pausing: pausing, session: session)
            } catch {
                refused = error.description
                break
            }
            payloads.append(reply.payload)
            prefixes += Codec.encodePageDataPrefix(reply.header, payloadLength: reply.payload.count)
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
        try served(session: session, conn: conn, refused: refused)
    }

    /// After replies went out: the digests may run once every page that holds
    /// data went out once; a refused request closes the connection.
    private func served(session: SourceSession, conn: any FrameConnection, refused: String?) throws(TransportError) {
        memory.noteServed()
        if let zeros = memory.zeroPageCount, session.distinctSent + zeros >= memory.table.totalPages { memory.wantDigests() }
        if let refused {
            stats.rejectedConnections.add(1, ordering: .relaxed)
            try? conn.send(.error(ErrorMessage(code: .outOfRange, message: refused)))
            throw .closed("closed after out-of-range request: \(refused)")
        }
    }

    /// The reply to one request (checked against the table, counted, marked
    /// sent): its header and its pages in guest memory (empty when all zero).
    private func servedPages(_ r: PageRequest, paused: Bool, pausing: Bool, session: SourceSession) throws(WireError) -> (header: PageDataHeader, payload: UnsafeRawBufferPointer) {
        let table = memory.table
        try table.validate(region: r.region, pageOffset: r.pageOffset, pageCount: UInt64(r.pageCount))
        let global = table.firstGlobalPage[Int(r.region)] + Int(r.pageOffset)
        let count = Int(r.pageCount)
        let allZero = memory.allZero(globalFirst: global, count: count)
        if r.pageClass == .precopy {
            // Precopy sends a page again when it was written: not "twice" (postcopy's count).
            precopy?.noteServed(session: session.id, globalFirst: global, count: count)
            stats.precopyPages.add(UInt64(count), ordering: .relaxed)
        } else {
            let dup = session.markSent(globalFirst: global, count: count)
            if dup > 0 { stats.pagesSentTwice.add(UInt64(dup), ordering: .relaxed) }
        }
        switch r.pageClass {
        case .demand: stats.demandPages.add(UInt64(count), ordering: .relaxed)
        case .prefetch: stats.prefetchPages.add(UInt64(count), ordering: .relaxed)
        case .background: stats.backgroundPages.add(UInt64(count), ordering: .relaxed)
        case .precopy: break
        }
        let header = PageDataHeader(requestID: r.requestID, region: r.region, pageClass: r.pageClass, isZero: allZero,
                                    sourcePaused: paused || (r.pageClass == .precopy && pausing),
                                    pageOffset: r.pageOffset, pageCount: r.pageCount)
        if allZero { stats.zeroReplies.add(1, ordering: .relaxed) }
        let regionBase = memory.mapping.base + Int(table.regions[Int(r.region)].sourceOffset)
        return (header, allZero ? UnsafeRawBufferPointer(start: nil, count: 0)
            : UnsafeRawBufferPointer(start: regionBase + Int(r.pageOffset) * table.pageSize, count: count * table.pageSize))
    }

    /// Answers a gather in one reply: every run checked first (one out of
    /// range refuses the whole gather and closes the connection), then the
    /// echoed runs and the non-zero ones' pages straight from guest memory, in
    /// one vectored send. Once the guest paused, or, of class precopy, during
    /// a precopy pass of this session (as `servePages` answers precopy
    /// requests: the pages were protected again before they are read).
    func serveGather(_ g: GatherRequest, _ channel: ServedChannel) throws(TransportError) {
        let paused = memory.isFrozen
        let precopying = precopy?.mayServe(session: channel.session.id) == true
        if g.pageClass == .precopy, !precopying {
            throw .protocolViolation("precopy gather \(g.firstRequestID) outside a precopy pass (none asked for, or the final dirty set was sent)")
        }
        guard paused || g.pageClass == .precopy else {
            throw .protocolViolation("gather request before the guest paused (its RAM is still changing)")
        }
        let pausing = g.pageClass == .precopy && precopy?.pausing == true
        let table = memory.table
        for r in g.runs {
            do { try table.validate(region: r.region, pageOffset: r.pageOffset, pageCount: UInt64(r.pageCount)) } catch {
                try served(session: channel.session, conn: channel.conn, refused: "gather \(g.firstRequestID): \(error.description)")
                return
            }
        }
        var runs: [GatherRun] = []
        runs.reserveCapacity(g.runs.count)
        var parts: [UnsafeRawBufferPointer] = [UnsafeRawBufferPointer(start: nil, count: 0)]
        parts.reserveCapacity(g.runs.count + 1)
        for r in g.requests {
            let reply: (header: PageDataHeader, payload: UnsafeRawBufferPointer)
            do { reply = try servedPages(r, paused: paused, pausing: pausing, session: channel.session) } catch {
                throw .protocolViolation("gather run checked, then refused: \(error)")
            }
            runs.append(GatherRun(region: r.region, pageOffset: r.pageOffset, pageCount: r.pageCount, isZero: reply.header.isZero))
            parts.append(reply.payload)
        }
        stats.gathers.add(1, ordering: .relaxed)
        if g.pageClass == .precopy { stats.precopyGathers.add(1, ordering: .relaxed) }
        let data = GatherData(firstRequestID: g.firstRequestID, pageClass: g.pageClass, sourcePaused: paused || pausing, runs: runs)
        let prefix = Codec.encodeGatherDataPrefix(data, payloadLength: data.payloadBytes(pageSize: table.pageSize))
        let result: Result<Void, TransportError> = prefix.withUnsafeBytes { raw in
            parts[0] = raw
            return Result { () throws(TransportError) in try channel.conn.sendv(parts) }
        }
        try result.get()
        try served(session: channel.session, conn: channel.conn, refused: nil)
    }
}
