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
    func install(globalFirst first: Int, count: Int, payload: UnsafeRawBufferPointer?,
                 expected: PageStates.State, onFaultThread: Bool) throws(TransportError) {
        assert(onFaultThread ? faultThread.isCurrent : backgroundThread.isCurrent, "install on a thread that does not own it")
        var i = 0
        var spins = 0
        while i < count {
            // The run of pages from i that may still be filled.
            let run: Int = pages.lock.withLock {
                while i < count, pages.state(first + i) != expected {
                    pages.forgetRemovedInflight(first + i)
                    i += 1
                }
                var n = 0
                while i + n < count, pages.state(first + i + n) == expected { n += 1 }
                return n
            }
            if run == 0 { break }
            let dst = map.address(ofGlobal: first + i)
            let r: Userfaultfd.FillResult
            do { r = try fill(dst, page: first + i, pages: run, from: payload.map { $0.baseAddress! + i * pageSize }) } catch {
                throw .local(error)
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
                    // kernel finishes it, and only the fault thread reads events.
                    if onFaultThread { try readEvents() } else { sched_yield() }
                }
            }
            if filled > 0 { settle(first + i, filled, onFaultThread: onFaultThread) }
            i += filled
        }
    }

    private var isCopy: Bool { if case .copy = installer { true } else { false } }

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
        case .continue(let deltas):
            // The bytes go into the alias first: the guest cannot see them until
            // CONTINUE maps the pages, and never before they are complete. A
            // zero page needs no write: the preallocated fresh file is zeros
            // there (ZEROPAGE would not map a page that is in the page cache).
            if let src {
                let alias = UnsafeMutableRawPointer(bitPattern: UInt(dst &+ deltas[map.regionIndex(ofGlobal: p)]))!
                alias.copyMemory(from: src, byteCount: len)
            }
            return try uffd.continue(at: dst, length: len)
        }
    }

    /// Marks pages present, records the service latency of faults waiting on them.
    /// Guest tasks parked on them (async page faults) hear "page ready": in the
    /// fault thread's next batch, or at once from the background thread.
    func settle(_ first: Int, _ count: Int, onFaultThread: Bool) {
        let recorder = onFaultThread ? latencyOnFaultThread : latencyOnBackgroundThread
        var now: UInt64 = 0
        var latencies: [UInt64] = []
        var tokens: [UInt64] = []
        let complete: Bool = pages.lock.withLock {
            // Read under the lock: another thread may have stamped a fault on
            // these pages after a clock read taken before it (a later time).
            now = nowNanoseconds()
            for p in first..<(first + count) {
                pages.set(p, .present)
                if let t0 = pages.takeWaiter(p) { latencies.append(now - min(t0, now)) }
                if !apfWaiters.isEmpty, let w = apfWaiters.removeValue(forKey: p) { tokens += w }
            }
            counters.settledPages.store(pages.settled, ordering: .relaxed)
            return pages.isComplete
        }
        for l in latencies { recorder.record(nanoseconds: l) }
        if onFaultThread { fault.readyBatch += tokens } else { postAPFReady(tokens) }
        if complete { markComplete(at: now) }
    }
}
