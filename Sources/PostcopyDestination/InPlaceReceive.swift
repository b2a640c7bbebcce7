import PostcopyTransport
import PostcopyWire

/// Page replies received straight into the alias of shared guest memory (the
/// continue path): each page is written once, by the kernel's recv, at its
/// final offset; `UFFDIO_CONTINUE` then maps it. A payload goes into place only
/// when it answers a request in flight exactly and every page is still in the
/// state that request left it in: those pages are then written by nobody else
/// (a page is in flight on one channel at a time, a fault on it waits for the
/// reply, and a REMOVE of it on this path leaves it in flight, to be zeroed
/// when the reply has landed). A cut mid-payload leaves the pages unmapped and
/// in flight; the request is sent again after the reconnect and its reply
/// overwrites them whole before they are mapped.
final class AliasPlacement: PagePlacement, @unchecked Sendable {
    weak var engine: PostcopyEngine?
    init(_ engine: PostcopyEngine) { self.engine = engine }
    func placement(for header: PageDataHeader, payloadBytes: Int) -> UnsafeMutableRawPointer? {
        engine?.placement(for: header, payloadBytes: payloadBytes)
    }
    var placementRegions: [UnsafeMutableRawBufferPointer] {
        guard let e = engine, case .continue(let deltas, _) = e.installer else { return [] }
        return e.map.regions.enumerated().map { i, r in
            UnsafeMutableRawBufferPointer(start: UnsafeMutableRawPointer(bitPattern: UInt(r.base &+ deltas[i])), count: r.size)
        }
    }
}

extension PostcopyEngine {
    /// The alias address for the payload of reply `h`, or nil (see `AliasPlacement`).
    func placement(for h: PageDataHeader, payloadBytes: Int) -> UnsafeMutableRawPointer? {
        guard case .continue(let deltas, _) = installer, !h.isZero else { return nil }
        let request = inflight.withLock { $0[h.requestID] }
        guard let request, Self.answers(h, request),
              Int(h.region) < table.regions.count,
              h.pageOffset + UInt64(h.pageCount) <= UInt64(table.pageCount(region: Int(h.region))),
              payloadBytes == Int(h.pageCount) * pageSize else { return nil }
        let first = table.firstGlobalPage[Int(h.region)] + Int(h.pageOffset)
        let count = Int(h.pageCount)
        // One guest region (one alias) holds the whole run.
        let ri = map.regionIndex(ofGlobal: first)
        guard map.regionIndex(ofGlobal: first + count - 1) == ri else { return nil }
        let expected = Self.inflightState(h.pageClass)
        let ok = pages.lock.withLock {
            (first..<(first + count)).allSatisfy { pages.state($0) == expected && !pages.wasRemovedInflight($0) }
        }
        guard ok else { return nil }
        counters.pagesReceivedInPlace.add(UInt64(count), ordering: .relaxed)
        return UnsafeMutableRawPointer(bitPattern: UInt(map.address(ofGlobal: first) &+ deltas[ri]))
    }

    /// Sets the placement on channels, [demand, background] (the continue
    /// path's, unless `receiveInPlace` is off; nothing on the copy path).
    func placeReplies(on channels: [PageChannel?]) {
        guard case .continue = installer, config.receiveInPlace else { return }
        for (i, c) in channels.enumerated() where i > 0 || config.receiveDemandInPlace { c?.setPlacement(alias) }
    }
}
