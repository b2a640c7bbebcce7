import PostcopyCore

/// After the final dirty set (`PrecopyReceiver.swift`): clean precopied pages
/// leave the userfaultfd, so that the guest's own minor faults map them.
extension PostcopyEngine {
    /// After a small final dirty set (its long clean runs already released by
    /// `releaseCleanRuns`): once no page is missing or in flight (the stale
    /// pages are in again) and no zero page waits to be written,
    /// the clean pages left are settled in one write per run and every guest
    /// region is unregistered from the userfaultfd with one call each (parts
    /// already unregistered are skipped): the guest's own minor faults map the
    /// rest, and its mapping, cut in pieces per run, merges again. Until then faults on
    /// clean pages are served by fault-around; one whose CONTINUE comes after
    /// the unregister finds the range gone (ENOENT) and counts as done
    /// (`wholeReleased`): the guest maps the page itself. Returns whether it
    /// released.
    @discardableResult
    func releaseAllWhenFetched() -> Bool {
        var perRun = false
        let done: SettledPages? = pages.lock.withLock {
            // No page may be in flight, registered or not: a page the fault
            // thread claimed (its request not sent yet, or its reply being
            // installed) would be mapped by the guest itself from the page
            // cache once unregistered, with the bytes precopied before it was
            // written again, and its reply would then overwrite the guest's
            // writes to it (found as one page mismatched in a hybrid run).
            // The request table is looked at too: on the copy path a page
            // removed while in flight is zero already, its reply still due.
            guard pages.releaseAllPending, pages.missing == 0, pages.inflightCount == 0, inflight.withLock({ $0.isEmpty }) else { return nil }
            pages.releaseAllPending = false
            // A zero page (removed by the VMM meanwhile) must still be written
            // as zeros and mapped here: release clean runs one by one instead.
            guard pages.zero == 0 else {
                perRun = true
                return nil
            }
            var done = SettledPages()
            var p = 0
            while let s = pages.next(.clean, from: p) {
                let len = pages.runLength(from: s, in: .clean, end: pages.count)
                settleCleanRunLocked(s, len, into: &done)
                p = s + len
            }
            wholeReleased.store(true, ordering: .releasing)
            return done
        }
        if perRun {
            releaseCleanRuns()
            return true
        }
        guard let done else { return false }
        for r in map.regions {
            do { try uffd.unregisterAndWake(r.base..<(r.base + UInt64(r.size))) } catch {
                // Still registered: its faults are served as present pages (a wake each).
                logger.warning("precopy: unregistering guest memory at 0x\(String(r.base, radix: 16)) failed: \(error)")
            }
        }
        counters.cleanPagesReleased.add(UInt64(done.pages), ordering: .relaxed)
        finishSettling(done, onFaultThread: false)
        return true
    }

    /// At most this many stale pages for `releaseAllWhenFetched`.
    static let wholeReleaseStalePages = 16384

    /// Clean pages in runs of at least `releasedRunPages` are settled and
    /// unregistered from the userfaultfd: the guest's page cache holds them
    /// as they were at the pause, so its own minor faults map them (about a
    /// microsecond each, on its own CPU, no message to this daemon), instead
    /// of one CONTINUE per page here, racing the guest's first touches. Only
    /// whole runs of clean pages: a page still missing must stay registered
    /// (unregistered, a hole would read as zeros). The longest runs go first,
    /// each claimed just before its release (a fault meanwhile on a clean
    /// page not yet released is served at once, by fault-around), and settled
    /// before the unregister, so a fault that comes in between finds them
    /// present and is only woken. Shorter runs are mapped by CONTINUE.
    func releaseCleanRuns() {
        var runs: [(first: Int, count: Int)] = []
        pages.lock.withLock {
            var p = 0
            while let s = pages.next(.clean, from: p) {
                let g = map.region(ofGlobal: s)
                let n = pages.runLength(from: s, in: .clean, end: g.sourceFirstPage + g.size / pageSize)
                if n >= Self.releasedRunPages { runs.append((s, n)) }
                p = s + n
            }
        }
        runs.sort { $0.count > $1.count }
        for r in runs.prefix(Self.maxReleasedRuns) {
            let claimed: SettledPages? = pages.lock.withLock {
                // Fault-around may have taken some of it meanwhile: then it is not one run any more.
                guard pages.runLength(from: r.first, in: .clean, end: r.first + r.count) == r.count else { return nil }
                var done = SettledPages()
                settleCleanRunLocked(r.first, r.count, into: &done)
                return done
            }
            guard let claimed else { continue }
            finishSettling(claimed, onFaultThread: false)
            let a = map.address(ofGlobal: r.first)
            do { try uffd.unregisterAndWake(a..<(a + UInt64(r.count * pageSize))) } catch {
                // Still registered: its faults are served as present pages (a wake each).
                logger.warning("precopy: unregistering \(r.count) clean pages at 0x\(String(a, radix: 16)) failed: \(error)")
                continue
            }
            counters.cleanPagesReleased.add(UInt64(r.count), ordering: .relaxed)
        }
    }

    /// Clean runs shorter than this are mapped by CONTINUE, and at most
    /// `maxReleasedRuns` are released (each release splits the guest's memory
    /// mapping in up to three: the kernel allows 65530 mappings a process).
    static let releasedRunPages = 256
    static let maxReleasedRuns = 8192
}
