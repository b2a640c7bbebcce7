import PostcopyTransport
import PostcopyWire

/// Requests in flight and the replies that settle them: every request is
/// registered in `inflight` by id before it leaves, and a reply is installed
/// only if it matches one exactly.
extension PostcopyEngine {
    /// A request with the next id (not yet registered in `inflight`).
    func newRequest(region: Int, page: Int, count: Int, class cls: PageClass) -> PageRequest {
        PageRequest(requestID: nextRequestID.wrappingAdd(1, ordering: .relaxed).oldValue, region: UInt16(region),
                    pageClass: cls, pageOffset: UInt64(page), pageCount: UInt32(count))
    }

    /// Requests for `runs` with consecutive ids (a gather's run i stands for
    /// its first id + i).
    func newRequests(_ runs: [(region: Int, page: Int, count: Int)], class cls: PageClass) -> [PageRequest] {
        let base = nextRequestID.wrappingAdd(UInt64(runs.count), ordering: .relaxed).oldValue
        return runs.enumerated().map { i, r in
            PageRequest(requestID: base &+ UInt64(i), region: UInt16(r.region), pageClass: cls, pageOffset: UInt64(r.page), pageCount: UInt32(r.count))
        }
    }

    /// In flight from now on: registered before it goes out (its reply may be
    /// drained before `submit` returns).
    func track(_ requests: [PageRequest]) {
        inflight.withLock { for r in requests { $0[r.requestID] = r } }
    }

    func submit(_ channel: PageChannel, region: Int, page: Int, count: Int, class cls: PageClass) throws(TransportError) {
        let r = newRequest(region: region, page: page, count: count, class: cls)
        track([r])
        try channel.submit(r)
    }

    /// Whether reply `h` answers `request` exactly (same pages, same class).
    static func answers(_ h: PageDataHeader, _ request: PageRequest) -> Bool {
        request.region == h.region && request.pageOffset == h.pageOffset && request.pageCount == h.pageCount && request.pageClass == h.pageClass
    }

    /// The state pages of a request of class `c` are in while it is out.
    static func inflightState(_ c: PageClass) -> PageStates.State {
        switch c {
        case .background: .inflightBackground
        case .precopy: .inflightPrecopy
        case .demand, .prefetch: .inflightDemand
        }
    }

    /// A reply drained from a channel by the fault thread (demand) or the
    /// background thread (`onFaultThread` false), the thread that installs it.
    func handleCompletion(_ h: PageDataHeader, _ payload: UnsafeRawBufferPointer, onFaultThread: Bool) throws(TransportError) {
        // Only pages we asked for may be installed: a peer cannot make us fill
        // (or overwrite) anything else.
        let request = inflight.withLock { $0.removeValue(forKey: h.requestID) }
        guard let request, Self.answers(h, request) else {
            throw .protocolViolation("reply \(h.requestID) (pages \(h.pageOffset)..<\(h.pageOffset + UInt64(h.pageCount)) of region \(h.region)) matches no request in flight: not requested")
        }
        let first = table.firstGlobalPage[Int(h.region)] + Int(h.pageOffset)
        let count = Int(h.pageCount)
        let expected = Self.inflightState(h.pageClass)
        let ok = pages.lock.withLock {
            (first..<(first + count)).allSatisfy { pages.state($0) == expected || pages.wasRemovedInflight($0) }
        }
        guard ok else {
            throw .protocolViolation("pages \(h.pageOffset)..<\(h.pageOffset + UInt64(h.pageCount)) of region \(h.region) were not requested as \(h.pageClass)")
        }
        if h.pageClass == .prefetch {
            prefetchSettled(count: count)
            streamPrefetch.withLock { _ = $0.remove(h.requestID) }
        }
        if h.pageClass != .precopy, recorder != nil || replay != nil {
            noteArrival(first: first, count: count, payload: h.isZero ? nil : payload)
        }
        if h.pageClass == .precopy {
            // Written into the alias only: mapped once the final dirty set says the page is clean.
            stage(globalFirst: first, count: count, payload: h.isZero ? nil : payload)
            return
        }
        if h.pageClass == .background, !h.isZero, !onFaultThread, holdsStreamedPages {
            // Left unmapped in the alias where no guest waits (`LazyStreamMapping.swift`).
            try holdStreamed(globalFirst: first, count: count, payload: payload)
            counters.backgroundPages.add(UInt64(count), ordering: .relaxed)
            return
        }
        try install(globalFirst: first, count: count, payload: h.isZero ? nil : payload, expected: expected,
                    onFaultThread: onFaultThread, demandReply: h.pageClass == .demand)
        if h.isZero {
            // The source found these all zero (it had no zero map yet): filled
            // with UFFDIO_ZEROPAGE, no payload crossed the wire.
            counters.zeroPagesReceived.add(UInt64(count), ordering: .relaxed)
        } else if h.pageClass == .background {
            counters.backgroundPages.add(UInt64(count), ordering: .relaxed)
        } else if h.pageClass == .prefetch {
            counters.prefetchPages.add(UInt64(count), ordering: .relaxed)
        } else {
            counters.demandPages.add(UInt64(count), ordering: .relaxed)
        }
    }
}
