import PostcopyCore
import PostcopyTransport
import PostcopyWire

/// One handler per control message of a page channel.
extension PageServer {
    /// A chunk of the device state; waits for the pause: a destination VMM asks
    /// ahead of time, like QEMU's -incoming.
    func handleDeviceStateRequest(_ d: DeviceStateRequest, _ channel: ServedChannel) throws(TransportError) -> ChannelFlow {
        guard let state = waitUntilFrozen(channel.conn) else { return .end }
        let total = UInt64(state.count)
        guard d.offset <= total else { throw .protocolViolation("device state offset \(d.offset) beyond \(total)") }
        let n = Int(min(UInt64(d.maxLength), total - d.offset, UInt64(WireProtocol.maxDeviceStateChunk)))
        let start = Int(d.offset)
        try channel.conn.send(.deviceState(DeviceState(totalSize: total, offset: d.offset, data: Array(state[start..<(start + n)]))))
        return .next
    }

    /// The xxh64 of a run of pages, as RAM was at the pause.
    func handlePageDigestRequest(_ r: PageDigestRequest, _ channel: ServedChannel) throws(TransportError) -> ChannelFlow {
        let table = memory.table
        do { try table.validate(region: r.region, pageOffset: r.firstPage, pageCount: UInt64(r.pageCount)) } catch {
            throw .protocolViolation(error.description)
        }
        // A guest checking its pages asks at once but needs them only at its
        // end: the digests do not start for it while pages stream.
        guard waitUntilFrozen(channel.conn) != nil, let scan = waitForScan(urgently: false) else { return .end }
        let first = table.firstGlobalPage[Int(r.region)] + Int(r.firstPage)
        try channel.conn.send(.pageDigests(PageDigests(region: r.region, firstPage: r.firstPage,
                                                       digests: Array(scan.pageDigests[first..<(first + Int(r.pageCount))]))))
        return .next
    }

    /// Remote READ access to guest RAM (an `RDMAOffer`), on the main channel only.
    func handleRemoteReadRequest(_ channel: ServedChannel) throws(TransportError) -> ChannelFlow {
        let conn = channel.conn
        guard channel.role == .main else { throw .protocolViolation("RDMA access asked for on the urgent channel") }
        guard let rdma else {
            // Not fatal: an `auto` destination goes on over TCP on this connection.
            try conn.send(.error(ErrorMessage(code: .rdmaUnavailable, message: "this source serves no RDMA (started with --transport tcp, or it has no RDMA device)")))
            return .next
        }
        // RAM is read remotely without us: only once it stopped changing, or,
        // for the destination copying it in precopy passes, once that began
        // (every page of a pass is protected against writes before the pass is
        // handed out, so a READ racing a write is caught by the next scan).
        guard waitUntilReadable(channel) else { return .end }
        precopy?.noteRemoteReads(session: channel.session.id)
        try conn.send(.rdmaOffer(rdma.offer(session: channel.session.id)))
        logger.info("session \(channel.session.id): RDMA access to guest RAM handed to \(conn.peer)")
        return .next
    }

    /// The pages of a precopy pass (`PrecopyController`), on the main channel.
    func handlePrecopyPass(_ p: PrecopyPassRequest, _ channel: ServedChannel) throws(TransportError) -> ChannelFlow {
        guard channel.role == .main else { throw .protocolViolation("precopy pass asked for on the urgent channel") }
        guard let precopy, precopy.offered else { throw .protocolViolation("precopy pass asked for, but this source does not precopy") }
        let conn = channel.conn
        guard let sets = try precopy.pass(p.pass, session: channel.session.id, alive: { peerWaits(conn) },
                                          waitFrozen: { waitUntilFrozen(conn) != nil }) else { return .end }
        for s in sets { try conn.send(.dirtySet(s)) }
        if let last = sets.last, last.isFinal {
            logger.info("session \(channel.session.id): final dirty set, \(sets.reduce(0) { $0 + $1.dirtyPages }) pages (\(last.decision))")
        }
        return .next
    }

    /// The destination has every page: compare digests, acknowledge, end the session.
    func handleComplete(_ c: Complete, _ channel: ServedChannel) throws(TransportError) {
        let session = channel.session
        // Only a destination that sent its digest waits for ours (a handoff
        // daemon sends none): the scan reads all of RAM, and would run while
        // the destination guest starts (on one machine, its CPU and cache).
        let sourceDigest = c.digest == nil ? 0 : waitForScan()?.digest ?? 0
        let matches = c.digest == sourceDigest && c.pagesReceived == UInt64(memory.table.totalPages)
        stats.lastDigestMatched.store(matches, ordering: .relaxed)
        let twice = stats.pagesSentTwice.load(ordering: .relaxed)
        try channel.conn.send(.completeAck(CompleteAck(digestMatches: matches, pagesSentTwice: twice)))
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
        sessions.end(session.id)
        rdma?.endSession(session.id)
        if exitAfterCompletion { done.signal() }
    }
}
