import CPostcopy
import PostcopyCore
import PostcopyTransport
import PostcopyWire
#if canImport(Glibc)
import Glibc
#endif

/// Recording a working set: the pages faulted on (fetched or waited on in
/// flight) in the first seconds after the engine started, in order, and the
/// digest of each as it arrived. Faults come from the fault thread, digests
/// from whichever thread installs the page.
final class WorkingSetRecorder: @unchecked Sendable {
    let seconds: Double
    /// The window starts at the first fault (the guest's resume), and ends `seconds` later.
    private(set) var startedAt: UInt64 = 0
    private(set) var until: UInt64 = .max
    private let lock = NSLockLite()
    private var order: [Int] = []
    private var recorded = Set<Int>()
    private var digests: [Int: UInt64] = [:]

    init(seconds: Double) { self.seconds = seconds }

    /// The fault thread saw a fault on pages [first, first + count) at `now`.
    func fault(first: Int, count: Int, at now: UInt64) {
        lock.withLock {
            if startedAt == 0 {
                startedAt = now
                until = now + UInt64(seconds * 1e9)
            }
            guard now < until else { return }
            for p in first..<(first + count) where recorded.insert(p).inserted { order.append(p) }
        }
    }

    /// The work being recorded is done (`RecordEnd`): the window ends now, if
    /// it is still open (and at once, if no fault came yet).
    func end(at now: UInt64) {
        lock.withLock {
            if startedAt == 0 { startedAt = now }
            until = min(until, now)
        }
    }

    /// How long the window lasted (or lasts), in ms.
    private var windowMs: UInt32 {
        let ns = until == .max ? seconds * 1e9 : Double(until - startedAt)
        return UInt32(min(ns / 1e6, Double(UInt32.max)))
    }

    /// Whether the window is over (nil: no fault yet).
    func over(at now: UInt64) -> Bool? { lock.withLock { startedAt == 0 ? nil : now >= until } }

    /// Pages [first, first + count) arrived with `payload` (nil: all zero).
    func arrived(first: Int, count: Int, payload: UnsafeRawBufferPointer?, pageSize: Int, zeroDigest: UInt64) {
        lock.withLock {
            guard !recorded.isEmpty else { return }
            for i in 0..<count where recorded.contains(first + i) && digests[first + i] == nil {
                digests[first + i] = payload.map { cpc_xxh64($0.baseAddress! + i * pageSize, pageSize, 0) } ?? zeroDigest
            }
        }
    }

    /// What was recorded: every recorded page whose bytes arrived, in fault order.
    func workingSet(table: RegionTable) -> WorkingSet {
        lock.withLock {
            WorkingSet(pageSize: UInt32(table.pageSize), regionPages: table.regions.map { $0.size / UInt64(table.pageSize) },
                       recordedMs: windowMs,
                       entries: order.compactMap { p in digests[p].map { WorkingSet.Entry(page: UInt64(p), digest: $0) } })
        }
    }
}

/// Replaying one: the pages still missing, streamed before anything else the
/// background thread asks for: in the order the guest first touched them,
/// in gathers (one request and one reply for many scattered runs), or, on a
/// channel that cannot gather (RDMA), in address order with small gaps
/// filled. The first `checkPages` still missing are checked against their
/// recorded digests as they arrive.
final class WorkingSetReplay: @unchecked Sendable {
    static let checkPages = 64
    private let lock = NSLockLite()
    /// Pages left to request (background thread, under the page lock): in fault order, and where `next` is.
    let order: [Int]
    var next = 0
    /// The same in address order (built on first use), and where `sortedNext` is.
    var sorted: [Int]?
    var sortedNext = 0
    /// Gathers sent so far (their size grows from `firstGatherPages`).
    var gathers = 0
    private var checks: [Int: UInt64]
    private(set) var refusal: String?
    private var checked = 0

    init(pages: [Int], checks: [Int: UInt64]) {
        order = pages
        self.checks = checks
    }

    var refused: Bool { lock.withLock { refusal != nil } }

    /// Pages [first, first + count) arrived: compares those under check.
    /// Returns a refusal message the first time a digest differs.
    func arrived(first: Int, count: Int, payload: UnsafeRawBufferPointer?, pageSize: Int, zeroDigest: UInt64) -> String? {
        lock.withLock {
            guard !checks.isEmpty, refusal == nil else { return nil }
            var bad = 0
            for i in 0..<count {
                guard let want = checks.removeValue(forKey: first + i) else { continue }
                checked += 1
                let got = payload.map { cpc_xxh64($0.baseAddress! + i * pageSize, pageSize, 0) } ?? zeroDigest
                if got != want { bad += 1 }
            }
            guard bad > 0 else { return nil }
            refusal = "page \(first)...: \(bad) of the \(checked) pages checked so far differ from their recorded digests (recorded from another memory image?)"
            checks.removeAll()
            return refusal
        }
    }
}

extension PostcopyEngine {
    /// xxh64 of a zero page of this engine's page size.
    static func zeroPageDigest(pageSize: Int) -> UInt64 {
        let z = [UInt8](repeating: 0, count: pageSize)
        return z.withUnsafeBytes { cpc_xxh64($0.baseAddress, pageSize, 0) }
    }

    /// The working set recorded so far (nil: not recording).
    public func recordedWorkingSet() -> WorkingSet? { recorder?.workingSet(table: table) }

    /// Why the replayed working set was refused (nil: it was not, or none was given).
    public var workingSetRefusal: String? { replayRefusal.withLock { $0 } }

    /// Builds the replay for `ws` (nil, with the refusal recorded, when its
    /// layout does not fit): its pages (those not missing when their
    /// turn comes are skipped), the first ones still missing under check.
    func makeReplay(_ ws: WorkingSet) -> WorkingSetReplay? {
        if let why = ws.mismatch(table) {
            refuseWorkingSet("does not fit this guest's memory: \(why)")
            return nil
        }
        return pages.lock.withLock {
            var checks: [Int: UInt64] = [:]
            for e in ws.entries where checks.count < WorkingSetReplay.checkPages && pages.state(Int(e.page)) == .missing {
                checks[Int(e.page)] = e.digest
            }
            return WorkingSetReplay(pages: ws.entries.map { Int($0.page) }, checks: checks)
        }
    }

    /// Pages between two recorded ones fetched with them in one request (the
    /// address-order replay, on a channel that cannot gather).
    static let replayGapPages = 16
    /// The first gather's pages; each next one twice as many, up to a batch:
    /// the guest's first pages arrive after a short reply, not a batch.
    static let firstGatherPages = 16
    /// Replayed pages in flight at most (gathers of a batch each): measured on
    /// 1 GiB kv restores (first 100,000 operations, 27k pages replayed), the
    /// work took 161 ms with the stream's window (512 pages), 122-127 ms with
    /// 2048, 123-137 ms with 4096-8192; larger gathers (256 pages) changed nothing.
    static let replayWindowPages = 2048

    /// While a working set is being recorded, the background stream waits
    /// (demand only), so the record holds every page the guest touched: until
    /// the window after the first fault is over, or twice its length when no
    /// fault comes. False when the engine is shutting down.
    func holdWhileRecording() -> Bool {
        guard let recorder else { return true }
        let start = nowNanoseconds()
        while true {
            let now = nowNanoseconds()
            if let over = recorder.over(at: now) {
                if over { return true }
            } else if now - start > UInt64(recorder.seconds * 2e9) {
                return true
            }
            if cpc_poll1(shutdown.fd.raw, Int16(POLLIN), 5) > 0 { return false }
        }
    }

    /// The VMM says the work being recorded is done (`RecordEnd`): the
    /// recording window ends now (nothing when not recording).
    public func endRecording() {
        guard let recorder else { return }
        recorder.end(at: nowNanoseconds())
        logger.info("working set: the recorded work is done; the window ends")
    }

    func refuseWorkingSet(_ why: String) {
        replayRefusal.withLock { if $0 == nil { $0 = why } }
        logger.error("working set refused: \(why); the migration goes on without it")
    }

    /// Page arrivals, for the recorder and the replay's checks.
    func noteArrival(first: Int, count: Int, payload: UnsafeRawBufferPointer?) {
        recorder?.arrived(first: first, count: count, payload: payload, pageSize: pageSize, zeroDigest: zeroDigest)
        if let replay, let why = replay.arrived(first: first, count: count, payload: payload, pageSize: pageSize, zeroDigest: zeroDigest) {
            refuseWorkingSet(why)
        }
    }

    /// Claims the next gather of the replay (background thread): recorded
    /// pages still missing, in fault order, as runs (a page right after the
    /// previous one in memory joins its run), `firstGatherPages` at first and
    /// twice as many each time up to a batch. Nil when the replay is over (or refused).
    func claimReplayGather() -> [(first: Int, count: Int)]? {
        assert(backgroundThread.isCurrent)
        guard let replay, !replay.refused else { return nil }
        let batch = max(config.batchPages / unitPages, 1) * unitPages
        return pages.lock.withLock { () -> [(first: Int, count: Int)]? in
            let limit = max(min(batch, Self.firstGatherPages << min(replay.gathers, 16)), unitPages)
            var runs: [(first: Int, count: Int)] = []
            var total = 0
            while replay.next < replay.order.count, total + unitPages <= limit, runs.count < WireProtocol.maxGatherRuns {
                let first = replay.order[replay.next] / unitPages * unitPages
                replay.next += 1
                guard pages.state(first) == .missing else { continue }
                for q in first..<(first + unitPages) { pages.set(q, .inflightBackground) }
                total += unitPages
                if let last = runs.last, last.first + last.count == first, sameRegions(last.first, first) {
                    runs[runs.count - 1].count += unitPages
                } else {
                    runs.append((first, unitPages))
                }
            }
            guard !runs.isEmpty else {
                _ = counters.replayRequestedAt.compareExchange(expected: 0, desired: nowNanoseconds(), ordering: .relaxed)
                return nil
            }
            replay.gathers += 1
            counters.replayPages.add(UInt64(total), ordering: .relaxed)
            return runs
        }
    }

    /// Whether two pages lie in one source region and one guest region (one run may hold both).
    private func sameRegions(_ a: Int, _ b: Int) -> Bool {
        table.locate(globalPage: a).region == table.locate(globalPage: b).region && map.regionIndex(ofGlobal: a) == map.regionIndex(ofGlobal: b)
    }

    /// Sends the runs as one gather of requests of class `cls` (consecutive ids).
    func submitGather(_ channel: PageChannel, runs: [(first: Int, count: Int)], class cls: PageClass = .background,
                      ownedByStream: Bool = false) throws(TransportError) {
        let requests = newRequests(runs.map { run in
            let (region, page) = table.locate(globalPage: run.first)
            return (region, page, run.count)
        }, class: cls)
        // Before they are in flight: a reconnect meanwhile must find them ours.
        if ownedByStream { streamPrefetch.withLock { for r in requests { $0.insert(r.requestID) } } }
        track(requests)
        try channel.submit(gather: requests)
    }

    /// Claims the next run of the replay in address order (background thread,
    /// a channel that cannot gather): recorded pages still missing, with the
    /// missing pages between them when they are close, one source and guest
    /// region, a batch at most. Nil when the replay is over (or refused).
    func claimReplayRun() -> (first: Int, count: Int)? {
        assert(backgroundThread.isCurrent)
        guard let replay, !replay.refused else { return nil }
        let batch = max(config.batchPages / unitPages, 1) * unitPages
        return pages.lock.withLock { () -> (first: Int, count: Int)? in
            if replay.sorted == nil { replay.sorted = replay.order.sorted() }
            let queue = replay.sorted!
            while replay.sortedNext < queue.count {
                let first = queue[replay.sortedNext] / unitPages * unitPages
                replay.sortedNext += 1
                guard pages.state(first) == .missing else { continue }
                let (region, page) = table.locate(globalPage: first)
                let g = map.region(ofGlobal: first)
                let regionEnd = min(first - page + table.pageCount(region: region), g.sourceFirstPage + g.size / pageSize)
                // The run goes on while the next recorded page is at most
                // `replayGapPages` further and every page up to it is missing:
                // a request per page costs far more than the few pages in
                // between (which the stream would bring anyway).
                var end = first + unitPages
                while replay.sortedNext < queue.count {
                    let q = queue[replay.sortedNext] / unitPages * unitPages
                    if q >= first && q < end { replay.sortedNext += 1; continue }  // already in the run
                    guard q >= end, q - end <= Self.replayGapPages, q + unitPages <= regionEnd, q + unitPages - first <= batch,
                          pages.runLength(from: end, in: .missing, end: q + unitPages) == q + unitPages - end else { break }
                    end = q + unitPages
                    replay.sortedNext += 1
                }
                let n = end - first
                for q in first..<end { pages.set(q, .inflightBackground) }
                counters.replayPages.add(UInt64(n), ordering: .relaxed)
                return (first, n)
            }
            _ = counters.replayRequestedAt.compareExchange(expected: 0, desired: nowNanoseconds(), ordering: .relaxed)
            return nil
        }
    }
}
