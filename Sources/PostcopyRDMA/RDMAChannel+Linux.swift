import CRDMA
import PostcopyCore
import PostcopyTransport
import PostcopyWire
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// One RC queue pair issuing one-sided RDMA READs of the source's registered
/// RAM (libibverbs `ibv_post_send` with `IBV_WR_RDMA_READ`) into registered
/// staging buffers; the source CPU does nothing per page. The demand channel's
/// completion queue is busy-polled by the fault thread while a READ is in
/// flight; the background channel's completions are event-driven (a completion
/// channel fd in the caller's epoll set) — the split Fastswap uses.
///
/// Used by one thread at a time (its engine thread); counters are atomic.
public final class RDMAPageChannel: PageChannel, @unchecked Sendable {
    private var conn: OpaquePointer?
    private let offer: RDMAOffer
    private let table: RegionTable
    public let busyPoll: Bool
    private let idleFD: EventFD?
    private let maxOutstanding: Int

    /// Registered staging buffers, pooled by size (pages rounded up to a power of two).
    private struct Buffer {
        let mapping: MemoryMapping
        let mr: UnsafeMutableRawPointer
        let lkey: UInt32
    }
    private var pool: [Int: [Buffer]] = [:]
    private var all: [Buffer] = []
    private struct InFlight {
        let request: PageRequest
        /// The staging buffer, or nil when the READ lands in place.
        let buffer: Buffer?
        let sizeClass: Int
        let length: Int
        /// Where the READ lands: the buffer's base, or the pages' final place.
        let to: UnsafeMutableRawPointer
    }
    /// READs straight into place (`PagePlacement`): the placement's memory,
    /// registered for local write only (this side's NIC writes it; no remote
    /// access is granted). Registration pins the (preallocated) pages.
    private var placement: PagePlacement?
    private var placedMRs: [(start: UInt, end: UInt, mr: UnsafeMutableRawPointer, lkey: UInt32)] = []
    /// Why READs do not land in place although a placement was set (registration refused).
    public private(set) var placementProblem: String?
    private var inflight: [UInt64: InFlight] = [:]
    /// Where `drainCompletions` polls completions into (one allocation, not one per call).
    private let wcs = UnsafeMutablePointer<crdma_wc>.allocate(capacity: RDMAPageChannel.completionsPerPoll)
    static let completionsPerPoll = 16
    /// How long a busy-polled channel's `drainCompletions` polls its queue in
    /// a tight loop while a READ is out (then the caller looks at its other
    /// descriptors, and calls again): in the soft-RoCE VM a system call per
    /// look (the caller's epoll) is a sizeable share of the READ's round trip.
    static let tightSpinNanoseconds: UInt64 = 30_000
    private var waiting: [PageRequest] = []
    private var nextWR: UInt64 = 1
    private let received = Atomic<UInt64>(0)
    private let reads = Atomic<UInt64>(0)

    init(conn: OpaquePointer, offer: RDMAOffer, table: RegionTable, kind: ChannelKind, maxOutstanding: Int) throws(TransportError) {
        self.conn = conn
        self.offer = offer
        self.table = table
        busyPoll = kind == .demand
        self.maxOutstanding = maxOutstanding
        if busyPoll {
            do { idleFD = try EventFD() } catch { throw .local(error) }
        } else {
            idleFD = nil
        }
    }

    deinit {
        close()
        wcs.deallocate()
    }

    private let retired = Atomic<Bool>(false)

    /// Breaks the channel for good without freeing anything another thread may
    /// still be using: the QP goes to the error state, so every READ in flight
    /// completes (flushed) and wakes its waiter, who then sees a closed channel.
    /// Resources go when the last user lets go (`deinit`).
    public func retire() {
        guard !retired.exchange(true, ordering: .acquiringAndReleasing), let c = conn else { return }
        _ = crdma_conn_break(c)
    }

    /// Serializes rdma_cm event handling (the transport's watcher) with teardown.
    private let cmLock = NSLockLite()

    /// True once the peer disconnected this QP (rdma_cm DISCONNECTED), and then
    /// retires the channel so its waiters wake. Called by the transport's watcher.
    func checkDisconnected() -> Bool {
        let gone = cmLock.withLock { conn.map { crdma_conn_disconnected($0) != 0 } ?? false }
        if gone { retire() }
        return gone
    }

    /// Releases the staging buffers and tears the QP down (reverse order of
    /// setup). Only for the channel's owner, when no other thread uses it.
    public func close() {
        cmLock.withLock { closeLocked() }
    }

    private func closeLocked() {
        guard let c = conn else { return }
        for b in all { crdma_dereg(b.mr) }
        all = []
        dropPlacedRegistrations()
        pool = [:]
        crdma_conn_destroy(c)
        conn = nil
    }

    public var pollDescriptor: Int32 {
        if let idleFD { return idleFD.fd.raw }
        return conn.map { crdma_comp_fd($0) } ?? -1
    }
    public var bytesSent: UInt64 { 0 }
    /// Many READs in flight keep the NIC busy while this side copies pages in
    /// (measured on soft-RoCE: 4 -> 16 in flight, +10-15% stream throughput).
    public var suggestedWindow: Int? { busyPoll ? nil : 16 }
    /// Payload bytes READ (the RoCE headers are the NIC's business).
    public var bytesReceived: UInt64 { received.load(ordering: .relaxed) }
    public var readsPosted: UInt64 { reads.load(ordering: .relaxed) }

    /// Where page `pageOffset` of `region` lives in the source's registered RAM;
    /// nil when any byte of the range falls outside it.
    func remoteRange(region: UInt16, pageOffset: UInt64, pageCount: UInt32) -> (address: UInt64, length: Int)? {
        guard (try? table.validate(region: region, pageOffset: pageOffset, pageCount: UInt64(pageCount))) != nil else { return nil }
        let pageSize = UInt64(table.pageSize)
        let start = table.regions[Int(region)].sourceOffset + pageOffset * pageSize
        let length = UInt64(pageCount) * pageSize
        guard start <= offer.length, length <= offer.length - start else { return nil }
        return (offer.remoteAddress + start, Int(length))
    }

    public func submit(_ request: PageRequest) throws(TransportError) {
        if retired.load(ordering: .relaxed) { throw .closed("RDMA channel retired after a failure") }
        guard remoteRange(region: request.region, pageOffset: request.pageOffset, pageCount: request.pageCount) != nil else {
            throw .local(SystemError("RDMA READ of pages \(request.pageOffset)..<\(request.pageOffset + UInt64(request.pageCount)) of region \(request.region): outside the source's registered RAM (\(offer.length) bytes)", errno: ERANGE))
        }
        waiting.append(request)
        try postWaiting()
    }

    /// Registers the placement's memory with this QP's protection domain (local
    /// write only); READs then land there when the placement says so. If the
    /// NIC refuses the registration, READs keep going through staging buffers
    /// (`placementProblem` says why).
    public func setPlacement(_ placement: PagePlacement?) {
        guard let c = conn else { return }
        dropPlacedRegistrations()
        self.placement = nil
        placementProblem = nil
        guard let placement else { return }
        for r in placement.placementRegions {
            var lkey: UInt32 = 0
            var mr: UnsafeMutableRawPointer?
            let rc = crdma_conn_reg(c, r.baseAddress!, r.count, &lkey, &mr)
            guard rc == 0, let mr else {
                placementProblem = "ibv_reg_mr of \(r.count) bytes of guest memory (local write): \(String(cString: strerror(-rc)))"
                dropPlacedRegistrations()
                return
            }
            let start = UInt(bitPattern: r.baseAddress!)
            placedMRs.append((start, start + UInt(r.count), mr, lkey))
        }
        self.placement = placement
    }

    private func dropPlacedRegistrations() {
        for m in placedMRs { crdma_dereg(m.mr) }
        placedMRs = []
    }

    /// Where the READ of `r` lands in place, with the key of its registration.
    private func placed(_ r: PageRequest, length: Int) -> (UnsafeMutableRawPointer, UInt32)? {
        guard let placement else { return nil }
        let h = PageDataHeader(requestID: r.requestID, region: r.region, pageClass: r.pageClass, isZero: false,
                               pageOffset: r.pageOffset, pageCount: r.pageCount)
        guard let to = placement.placement(for: h, payloadBytes: length) else { return nil }
        let a = UInt(bitPattern: to)
        guard let m = placedMRs.first(where: { $0.start <= a && a + UInt(length) <= $0.end }) else { return nil }
        return (to, m.lkey)
    }

    private func postWaiting() throws(TransportError) {
        guard let c = conn else { throw .closed("RDMA channel closed") }
        var i = 0
        defer { waiting.removeFirst(i) }
        while i < waiting.count, inflight.count < maxOutstanding {
            let r = waiting[i]
            let (address, length) = remoteRange(region: r.region, pageOffset: r.pageOffset, pageCount: r.pageCount)!
            let sizeClass = Int(UInt32(r.pageCount).nextPowerOfTwo)
            let inPlace = placed(r, length: length)
            let buffer = inPlace == nil ? try takeBuffer(sizeClass: sizeClass) : nil
            let (to, lkey) = inPlace ?? (buffer!.mapping.base, buffer!.lkey)
            let wr = nextWR
            nextWR += 1
            let rc = crdma_post_read(c, wr, to, lkey, UInt32(length), address, offer.rkey)
            if rc < 0 {
                if let buffer { pool[sizeClass, default: []].append(buffer) }
                throw .closed("ibv_post_send (RDMA READ): \(String(cString: strerror(-rc)))")
            }
            inflight[wr] = InFlight(request: r, buffer: buffer, sizeClass: sizeClass, length: length, to: to)
            reads.add(1, ordering: .relaxed)
            i += 1
        }
    }

    private func takeBuffer(sizeClass: Int) throws(TransportError) -> Buffer {
        if let b = pool[sizeClass]?.popLast() { return b }
        guard let c = conn else { throw .closed("RDMA channel closed") }
        let mapping: MemoryMapping
        do { mapping = try MemoryMapping.anonymous(length: sizeClass * table.pageSize) } catch { throw .local(error) }
        var lkey: UInt32 = 0
        var mr: UnsafeMutableRawPointer?
        let rc = crdma_conn_reg(c, mapping.base, mapping.length, &lkey, &mr)
        guard rc == 0, let mr else { throw .local(SystemError("ibv_reg_mr of a \(mapping.length)-byte staging buffer", errno: -rc)) }
        let b = Buffer(mapping: mapping, mr: mr, lkey: lkey)
        all.append(b)
        return b
    }

    public func drainCompletions(_ body: (PageDataHeader, UnsafeRawBufferPointer) throws(TransportError) -> Void) throws(TransportError) -> Int {
        guard let c = conn else { throw .closed("RDMA channel closed") }
        if !busyPoll {
            let rc = crdma_rearm(c)
            if rc < 0 { throw .closed("re-arming the completion queue: \(String(cString: strerror(-rc)))") }
        }
        var n = 0
        var polls = 0
        var spinUntil: UInt64 = 0
        while true {
            let got = crdma_poll(c, wcs, Int32(Self.completionsPerPoll))
            if got < 0 { throw .closed("ibv_poll_cq failed") }
            if got == 0 {
                // A busy-polled READ still out: poll the queue alone for a
                // while (no system call per look) before going back to the
                // caller's loop, which also watches the userfaultfd.
                guard busyPoll, n == 0, !inflight.isEmpty else { break }
                polls += 1
                if polls % 32 != 0 { continue }
                let now = nowNanoseconds()
                if spinUntil == 0 { spinUntil = now + Self.tightSpinNanoseconds } else if now >= spinUntil { break }
                continue
            }
            for wc in UnsafeBufferPointer(start: wcs, count: Int(got)) {
                guard let f = inflight.removeValue(forKey: wc.wr_id) else {
                    throw .local(SystemError("completion for unknown work request \(wc.wr_id)", errno: EPROTO))
                }
                if let b = f.buffer { pool[f.sizeClass, default: []].append(b) }
                guard wc.status == WorkCompletionStatus.success else {
                    let what = "RDMA READ of pages \(f.request.pageOffset)..<\(f.request.pageOffset + UInt64(f.request.pageCount)) of region \(f.request.region): \(String(cString: crdma_wc_status_str(wc.status))) (status \(wc.status), vendor error \(wc.vendor_err))"
                    if wc.status == WorkCompletionStatus.remoteAccessError {
                        // The source's NIC refused: outside its registered RAM, or a stale rkey.
                        throw .protocolViolation(what)
                    }
                    // IBV_WC_WR_FLUSH_ERR: the QP went to error (teardown); anything
                    // else (retry exceeded, ...) also leaves the QP unusable.
                    throw .closed(what)
                }
                received.add(UInt64(f.length), ordering: .relaxed)
                let h = PageDataHeader(requestID: f.request.requestID, region: f.request.region, pageClass: f.request.pageClass,
                                       isZero: false, pageOffset: f.request.pageOffset, pageCount: f.request.pageCount)
                try body(h, UnsafeRawBufferPointer(start: f.to, count: f.length))
                n += 1
            }
        }
        if !waiting.isEmpty { try postWaiting() }
        return n
    }

    /// For tests of the source's protection: posts one READ of `length` bytes at
    /// `address` (anywhere, unchecked) and waits for its completion status
    /// (0 = success, else an `ibv_wc_status`).
    @_spi(Testing) public func rawReadStatus(address: UInt64, length: Int, timeoutMs: Int = 30_000) throws(TransportError) -> Int32 {
        guard let c = conn else { throw .closed("RDMA channel closed") }
        let sizeClass = Int(UInt32((length + table.pageSize - 1) / table.pageSize).nextPowerOfTwo)
        let buffer = try takeBuffer(sizeClass: sizeClass)
        defer { pool[sizeClass, default: []].append(buffer) }
        let wr = UInt64.max - nextWR
        nextWR += 1
        let rc = crdma_post_read(c, wr, buffer.mapping.base, buffer.lkey, UInt32(length), address, offer.rkey)
        if rc < 0 { throw .closed("ibv_post_send: \(String(cString: strerror(-rc)))") }
        let deadline = nowNanoseconds() + UInt64(timeoutMs) * 1_000_000
        var wc = crdma_wc()
        while nowNanoseconds() < deadline {
            if crdma_poll(c, &wc, 1) == 1 { return wc.status }
            usleep(100)
        }
        throw .timedOut("no completion for a raw RDMA READ in \(timeoutMs) ms")
    }
}

extension UInt32 {
    fileprivate var nextPowerOfTwo: UInt32 { self <= 1 ? 1 : 1 << (32 - (self - 1).leadingZeroBitCount) }
}
