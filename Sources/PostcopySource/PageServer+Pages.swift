import PostcopyCore
import PostcopyTransport
import PostcopyWire

extension PageServer {
    /// Page replies gathered into one sendmsg at most (a burst of demand faults).
    static let maxRepliesPerSend = 64

    /// Answers `first` and every page request already there after it (up to
    /// `maxRepliesPerSend`) in one send; returns the other message read on the
    /// way, if any, for the dispatch loop.
    func handlePageRequests(first: PageRequest, _ channel: ServedChannel) throws(TransportError) -> Message? {
        var batch = [first]
        var next: Message?
        while batch.count < Self.maxRepliesPerSend, let more = try channel.conn.tryReceive() {
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
        let table = memory.table
        let pageSize = table.pageSize
        let prefixBytes = WireProtocol.headerSize + PageDataHeader.encodedSize
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
        memory.noteServed()
        // Every page that holds data has gone out once: the digests may run now.
        if let zeros = memory.zeroPageCount, session.distinctSent + zeros >= table.totalPages { memory.wantDigests() }
        if let refused {
            stats.rejectedConnections.add(1, ordering: .relaxed)
            try? conn.send(.error(ErrorMessage(code: .outOfRange, message: refused)))
            throw .closed("closed after out-of-range request: \(refused)")
        }
    }
}
