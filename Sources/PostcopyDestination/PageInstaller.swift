import PostcopyCore
import PostcopyTransport
#if canImport(Glibc)
import Glibc
#endif

/// Filling guest pages through the uffd and settling them in the page table, by
/// either install path (`InstallPath`: UFFDIO_COPY, or alias + UFFDIO_CONTINUE).
extension PostcopyEngine {
    /// Installs pages [first, first+count) (global, one guest region) from
    /// `payload` (nil = zeros) and settles them. Only pages still in `expected`
    /// state are filled: a page the VMM removed meanwhile (UFFD_EVENT_REMOVE) is
    /// skipped, never filled from the source. EEXIST means already present (wake);
    /// EAGAIN (partial copy, or a remove pending) retries what is left after the
    /// fault thread has read the pending events.
    /// `demandReply`: the pages answer a demand request (their waiters' latency
    /// is also counted apart: `demandRequestLatency`).
    func install(globalFirst first: Int, count: Int, payload: UnsafeRawBufferPointer?,
                 expected: PageStates.State, onFaultThread: Bool, demandReply: Bool = false) throws(TransportError) {
        assert(onFaultThread ? faultThread.isCurrent : backgroundThread.isCurrent, "install on a thread that does not own it")
        var i = 0
        var spins = 0
        while i < count {
            // One run under the remove guard (background only; see `removeGuard`).
            // Released between runs, so a remove pending behind an EAGAIN can be
            // applied by the fault thread.
            let step: (filled: Int, done: Bool) = try onFaultThread
                ? installRun(first, &i, count, payload, expected, onFaultThread: true, demandReply: demandReply, spins: &spins)
                : removeGuard.withLock { () throws(TransportError) in
                    try installRun(first, &i, count, payload, expected, onFaultThread: false, demandReply: demandReply, spins: &spins)
                }
            if step.done { break }
            if step.filled == 0 && !onFaultThread { sched_yield() }
        }
    }

    /// Fills and settles the run of pages from `i` still in `expected` state,
    /// advancing `i`. `done`: no page left to fill.
    private func installRun(_ first: Int, _ i: inout Int, _ count: Int, _ payload: UnsafeRawBufferPointer?,
                            _ expected: PageStates.State, onFaultThread: Bool, demandReply: Bool,
                            spins: inout Int) throws(TransportError) -> (filled: Int, done: Bool) {
        // The run of pages from i that may still be filled, and whether they
        // were removed while in flight (continue path: they stay in flight,
        // and are zeroed now that their reply, which may have landed in the
        // alias, is in).
        let (run, removed): (Int, Bool) = pages.lock.withLock {
            while i < count, pages.state(first + i) != expected {
                pages.forgetRemovedInflight(first + i)
                i += 1
            }
            guard i < count else { return (0, false) }
            let removed = !isCopy && pages.wasRemovedInflight(first + i)
            var n = 0
            while i + n < count, pages.state(first + i + n) == expected,
                  (!isCopy && pages.wasRemovedInflight(first + i + n)) == removed { n += 1 }
            return (n, removed)
        }
        if run == 0 { return (0, true) }
        let dst = map.address(ofGlobal: first + i)
        let r: Userfaultfd.FillResult
        do { r = try fill(dst, page: first + i, pages: run, from: removed ? nil : payload.map { $0.baseAddress! + i * pageSize }) } catch {
            // Guest memory left the userfaultfd whole (`releaseAllWhenFetched`)
            // only once no page was in flight: a page installed after that
            // was claimed too late, and the guest may have mapped it itself
            // before its bytes were in. Said loudly; its bytes are in the
            // page cache now, which the guest maps.
            guard error.errno == ENOENT, wholeReleased.load(ordering: .acquiring) else { throw .local(error) }
            logger.error("pages \(first + i)..<\(first + i + run) installed after guest memory left the userfaultfd: the guest may have seen them before their bytes were in")
            r = .done
        }
        var filled = 0
        switch r {
        case .done:
            filled = payload == nil && zeroUnit != nil && isCopy ? unitPages : run
        case .exists(let n):
            counters.eexist.add(1, ordering: .relaxed)
            // Pages before the present one are in; wake anyone waiting on it.
            filled = n / unitBytes * unitPages + unitPages
            uffd.wake(dst + UInt64(n / unitBytes * unitBytes), length: unitBytes)
        case .again(let n):
            counters.eagain.add(1, ordering: .relaxed)
            filled = n / unitBytes * unitPages
            if filled == 0 {
                spins += 1
                if spins > 1_000_000 { throw .local(SystemError("UFFDIO_\(isCopy ? "COPY" : "CONTINUE") kept returning EAGAIN", errno: EAGAIN)) }
                // A remove is pending: its event must be read before the
                // kernel finishes it, and only the fault thread reads events
                // (the background thread yields outside the remove guard).
                if onFaultThread { try readEvents() }
            }
        }
        if filled > 0 {
            if removed { pages.lock.withLock { for q in (first + i)..<(first + i + filled) { pages.forgetRemovedInflight(q) } } }
            if isCopy {
                counters.pagesCopied.add(UInt64(filled), ordering: .relaxed)
            } else {
                counters.pagesContinued.add(UInt64(filled), ordering: .relaxed)
            }
            settle(first + i, filled, onFaultThread: onFaultThread, demandReply: demandReply)
        }
        i += filled
        return (filled, false)
    }

    var isCopy: Bool { if case .copy = installer { true } else { false } }

    /// One fill of `count` pages at guest address `dst` (global page `p`) from
    /// `src` (nil: zeros), by the engine's install path.
    private func fill(_ dst: UInt64, page p: Int, pages count: Int, from src: UnsafeRawPointer?) throws(SystemError) -> Userfaultfd.FillResult {
        let len = count * pageSize
        switch installer {
        case .copy:
            if let src { return try uffd.copy(to: dst, from: src, length: len) }
            // hugetlbfs has no UFFDIO_ZEROPAGE: copy one zeroed guest page.
            if let zeroUnit { return try uffd.copy(to: dst, from: zeroUnit.base, length: unitBytes) }
            return try uffd.zeropage(at: dst, length: len)
        case .continue(let deltas, _):
            // The bytes go into the alias first: the guest cannot see them until
            // CONTINUE maps the pages, and never before they are complete. A
            // zero page is written as zeros too: the file may hold anything
            // there (the VMM's file, or a page the VMM removed and we punched),
            // and ZEROPAGE would not map a page that is in the page cache.
            let alias = UnsafeMutableRawPointer(bitPattern: UInt(dst &+ deltas[map.regionIndex(ofGlobal: p)]))!
            if let src {
                // Received in place (`InPlaceReceive.swift`): already there.
                if src != UnsafeRawPointer(alias) { alias.copyMemory(from: src, byteCount: len) }
            } else {
                alias.initializeMemory(as: UInt8.self, repeating: 0, count: len)
            }
            return try uffd.continue(at: dst, length: len)
        }
    }

    /// Marks pages present, records the service latency of faults waiting on them.
    /// Guest tasks parked on them (async page faults) hear "page ready": in the
    /// fault thread's next batch, or at once from the background thread.
    func settle(_ first: Int, _ count: Int, onFaultThread: Bool, demandReply: Bool = false) {
        var done = SettledPages()
        pages.lock.withLock {
            done.stamp()
            for p in first..<(first + count) {
                pages.set(p, .present)
                if let t0 = pages.takeWaiter(p) { done.waits.append(t0) }
            }
            takeAPFWaiters(first, count, into: &done)
        }
        finishSettling(done, onFaultThread: onFaultThread, demandReply: demandReply)
    }

    /// Under `pages.lock`: the clean precopied pages [first, first+count), one
    /// run, present in one write (`settle` for a run that needs no install).
    func settleCleanRunLocked(_ first: Int, _ count: Int, into done: inout SettledPages) {
        done.stamp()
        done.waits += pages.setRun(first, count, to: .present)
        done.pages += count
        takeAPFWaiters(first, count, into: &done)
    }

    /// Under `pages.lock`: the tokens of guest tasks parked on pages
    /// [first, first+count), and whether every page is in now.
    private func takeAPFWaiters(_ first: Int, _ count: Int, into done: inout SettledPages) {
        if !apfWaiters.isEmpty {
            for p in first..<(first + count) { if let w = apfWaiters.removeValue(forKey: p) { done.tokens += w } }
        }
        counters.settledPages.store(pages.settled, ordering: .relaxed)
        done.complete = pages.isComplete
    }

    /// After the lock: service latencies recorded, parked guest tasks told
    /// "page ready" (in the fault thread's next batch, or at once), completion.
    func finishSettling(_ done: SettledPages, onFaultThread: Bool, demandReply: Bool = false) {
        let recorder = onFaultThread ? latencyOnFaultThread : latencyOnBackgroundThread
        for t0 in done.waits { recorder.record(nanoseconds: done.now - min(t0, done.now)) }
        if let o = config.observer { for t0 in done.waits { o.faultServed(done.now - min(t0, done.now)) } }
        if demandReply {
            let r = onFaultThread ? demandLatencyOnFaultThread : demandLatencyOnBackgroundThread
            for t0 in done.waits { r.record(nanoseconds: done.now - min(t0, done.now)) }
        }
        if onFaultThread { fault.readyBatch += done.tokens } else { postAPFReady(done.tokens) }
        if done.complete { markComplete(at: done.now) }
    }
}
