import CPostcopy
import PostcopyCore
import PostcopyTransport
#if canImport(Glibc)
import Glibc
#endif

/// The fault thread's handling of userfaultfd messages: page faults (and async
/// "page not present" requests, which take the same path) and REMOVE events.
extension PostcopyEngine {
    func readEvents() throws(TransportError) {
        assert(faultThread.isCurrent)
        let msgs = fault.msgs
        while true {
            let n: Int
            do { n = try uffd.readEvents(msgs, max: FaultThreadState.messageCapacity) } catch { throw .local(error) }
            if n == 0 { return }
            // A REMOVE is applied before anything else read with it: once read,
            // the event lets the VMM's madvise go on and zap the range, and on
            // the copy path a background UFFDIO_COPY landing after the zap but
            // before the remove is applied would fill a removed page from the
            // source (README, "VMM handoff"). The continue path is safe: the
            // remove punches the file, which zaps whatever was mapped meanwhile.
            for i in 0..<n where msgs[i].event == CPC_UFFD_EVENT_REMOVE {
                handleRemove(start: msgs[i].arg.remove.start, end: msgs[i].arg.remove.end)
            }
            let now = nowNanoseconds()
            for i in 0..<n where msgs[i].event == CPC_UFFD_EVENT_PAGEFAULT {
                handleFault(address: msgs[i].arg.pagefault.address, at: now)
            }
            // Fewer than asked for: the queue was empty when read (the kernel
            // hands out every pending message up to the buffer's size). A
            // fault queued since keeps the descriptor readable (level-triggered
            // epoll): no second read that would only say EAGAIN.
            if n < FaultThreadState.messageCapacity { return }
        }
    }

    /// A guest touched a missing page (a uffd fault, or an async "page not
    /// present" from the APF channel): fetch it once, however many wait for it.
    /// `again`: a fault handled before (parked), not counted twice.
    func handleFault(address: UInt64, at now: UInt64, again: Bool = false) {
        assert(faultThread.isCurrent)
        let addr = address & ~UInt64(unitBytes - 1)
        guard let p = map.globalPage(addr) else {
            logger.error("fault at 0x\(String(addr, radix: 16)) outside guest memory; ignored")
            return
        }
        if !again { counters.faults.add(1, ordering: .relaxed) }
        enum Action { case fetch, zero, wake, wait, local(Int, Int), parked }
        let action: Action = pages.lock.withLock {
            pages.markFaulted(p, at: now)
            switch pages.state(p) {
            case .missing:
                for q in p..<(p + unitPages) { pages.set(q, .inflightDemand) }
                return .fetch
            case .zero:
                for q in p..<(p + unitPages) { pages.set(q, .inflightDemand) }
                return .zero
            case .present:
                _ = pages.takeWaiter(p)
                return .wake
            case .inflightDemand, .inflightBackground:
                return .wait
            case .clean:
                // Precopied and clean: in the alias already, only to be mapped,
                // with the clean pages around it (fault-around: no transfer, and
                // the guest's next touches nearby are no faults).
                let block = Self.cleanFaultAroundPages
                let g = map.region(ofGlobal: p)
                let lo = max(p / block * block, g.sourceFirstPage), hi = min(p / block * block + block, g.sourceFirstPage + g.size / pageSize)
                var first = p, end = p + 1
                while first > lo, pages.state(first - 1) == .clean { first -= 1 }
                while end < hi, pages.state(end) == .clean { end += 1 }
                for q in first..<end { pages.set(q, .inflightDemand) }
                return .local(first, end - first)
            case .staged, .inflightPrecopy:
                // Maybe stale: waits for the final dirty set (`retryParkedFaults`).
                pages.parkedOnFinalSet.append(address)
                return .parked
            }
        }
        switch action {
        case .fetch:
            recorder?.fault(first: p, count: unitPages, at: now)
            fault.deferredDemand.append(p)
            if !again { planPrefetch(after: p, fetched: true, waited: false) }
        case .zero:
            fault.deferredZero.append(p)
            if !again { planPrefetch(after: p, fetched: false, waited: false) }
        case .wake:
            // Installed between the fault and now; the copy already woke
            // the range, but a wake is cheap and never loses a waiter.
            // With shared memory a present page can also have lost its
            // mapping: punching part of a huge folio (a REMOVE, a stale
            // precopied page) unmaps the whole folio, so the guest faults
            // MINOR on pages we installed. Mapped again here (EEXIST when it
            // was only the race); a wake alone would loop that fault forever.
            if !isCopy {
                // (After the whole release or its block's, ENOENT: the guest maps it itself.)
                do { _ = try uffd.continue(at: addr, length: unitBytes) } catch {
                    let released = wholeReleased.load(ordering: .acquiring) || streamReleased.load(ordering: .acquiring)
                    if error.errno != ENOENT || !released { logger.error("mapping again a present page at 0x\(String(addr, radix: 16)) failed: \(error)") }
                }
            }
            uffd.wake(addr, length: unitBytes)
            releaseAPFWaiters([p])
        case .wait:
            recorder?.fault(first: p, count: unitPages, at: now)
            counters.faultsCoalesced.add(1, ordering: .relaxed)
            if !again { planPrefetch(after: p, fetched: false, waited: true) }
        case .local(let first, let count):
            fault.deferredLocal.append((first, count))
        case .parked:
            counters.faultsParkedOnFinalSet.add(1, ordering: .relaxed)
        }
    }

    /// Clean precopied pages mapped with one faulted on: the aligned block around it.
    static let cleanFaultAroundPages = 512

    /// UFFD_EVENT_REMOVE: the VMM discarded [start, end) (MADV_DONTNEED: balloon,
    /// hot-unplug). Those pages must never again be filled from the source; touched
    /// later they read as zero. In-flight fetches for them are dropped on arrival,
    /// and threads parked on them are woken to fault again (and get a zero page).
    ///
    /// On the continue path the removed range is also punched out of the memory
    /// file (what MADV_REMOVE does; after MADV_DONTNEED on shared memory the
    /// file would otherwise still hold the bytes): with the remove guard held, no
    /// background write into the alias is under way, and none that came before
    /// survives, so the guest reads zeros there, as on the copy path.
    func handleRemove(start: UInt64, end: UInt64) {
        assert(faultThread.isCurrent)
        var lo = start & ~UInt64(unitBytes - 1)
        var touched: [(UInt64, Int)] = []
        removeGuard.withLock {
            while lo < end {
                guard let p = map.globalPage(lo) else { lo += UInt64(pageSize); continue }
                let ri = map.regionIndex(ofGlobal: p)
                let r = map.regions[ri]
                let last = min(end, r.base + UInt64(r.size))
                let n = Int((last - lo + UInt64(pageSize) - 1) / UInt64(pageSize))
                pages.lock.withLock {
                    var inflight: UInt64 = 0
                    for q in p..<(p + n) where pages.markRemoved(q, keepInflight: !isCopy) { inflight += 1 }
                    counters.removedInFlight.add(inflight, ordering: .relaxed)
                    counters.settledPages.store(pages.settled, ordering: .relaxed)
                }
                if case .continue(_, let files) = installer {
                    let off = files[ri].offset + (lo - r.base)
                    let rc = cpc_fallocate_punch_hole(files[ri].fd, Int64(off), Int64(n * pageSize))
                    if rc < 0 {
                        logger.error("REMOVE at 0x\(String(lo, radix: 16)): punching \(n * pageSize) bytes of the memory file failed: \(SystemError("fallocate", errno: -rc)); the pages are zeroed when touched")
                    }
                }
                touched.append((lo, n * pageSize))
                lo += UInt64(n * pageSize)
            }
        }
        counters.removedRanges.add(1, ordering: .relaxed)
        for (a, len) in touched { uffd.wake(a, length: len) }
        // Async waiters too: their access runs again and asks anew (a zero page).
        releaseAPFWaiters(touched.flatMap { (a, len) -> [Int] in
            guard let p = map.globalPage(a) else { return [] }
            return Array(stride(from: p, to: p + len / pageSize, by: unitPages))
        })
        if pages.lock.withLock({ pages.isComplete }) { markComplete(at: nowNanoseconds()) }
    }
}
