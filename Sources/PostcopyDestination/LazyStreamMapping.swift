import CPostcopy
import PostcopyCore
import PostcopyTransport
#if canImport(Glibc)
import Glibc
#endif

/// The background stream's pages on the continue path, held unmapped: their
/// bytes are in the alias (received there in place), and a page no guest
/// waits on is left there (state clean) instead of being mapped by one
/// UFFDIO_CONTINUE here. Once every page of its block is in, the block leaves
/// the userfaultfd, and the guest's own minor faults map its pages from the
/// page cache, with the kernel's fault-around, only those it touches. A guest
/// that touches a held page before that faults as on a clean precopied page:
/// it is mapped at once, with the held pages around it.
///
/// Measured before (1 GiB kv guest, pure postcopy, loopback TCP, 2 cores,
/// `perf record -g`): the daemon's background thread spent about half its
/// time in UFFDIO_CONTINUE (`mfill_atomic_continue`, page cache lookups, PTE
/// installs), the other half receiving.
///
/// Safety: a block leaves the userfaultfd only when each of its pages is
/// clean (its whole reply is in the alias) or present, checked under the
/// pages lock, and held pages are settled before the unregister; a page
/// missing, in flight or zero (not yet written as zeros) keeps its block
/// registered. Removes follow the clean pages' rules (`markRemoved`).
extension PostcopyEngine {
    /// Pages per block (8 MiB of 4 KiB pages). Each release splits the guest's
    /// memory mapping in up to three; released neighbours merge again.
    static let heldBlockPages = 2048

    /// Continue path, pure postcopy (precopy keeps its own clean pages), no
    /// working set replayed (the guest wants those pages at once), 4 KiB pages.
    var holdsStreamedPages: Bool {
        !isCopy && config.mapStreamLazily && precopyProvider == nil && replay == nil && unitPages == 1
    }

    /// The block of page `p`, inside its guest region.
    func heldBlock(_ p: Int) -> Range<Int> {
        let g = map.region(ofGlobal: p)
        let end = g.sourceFirstPage + g.size / pageSize
        let s = g.sourceFirstPage + (p - g.sourceFirstPage) / Self.heldBlockPages * Self.heldBlockPages
        return s..<min(s + Self.heldBlockPages, end)
    }

    /// A background reply, not zero: into the alias (where it was received,
    /// usually), then each page no guest waits on (no fault recorded, no async
    /// waiter) and not removed meanwhile is held; the others are installed as
    /// any reply (mapped, their waiters woken).
    func holdStreamed(globalFirst first: Int, count: Int, payload: UnsafeRawBufferPointer) throws(TransportError) {
        assert(backgroundThread.isCurrent)
        var held = 0
        removeGuard.withLock {
            let alias = aliasBuffer(globalFirst: first, count: count)
            if payload.baseAddress != alias.baseAddress, payload.count == alias.count {
                UnsafeMutableRawPointer(mutating: alias.baseAddress!).copyMemory(from: payload.baseAddress!, byteCount: alias.count)
            }
            held = pages.lock.withLock { holdRunLocked(first, count) }
        }
        counters.streamedPagesHeld.add(UInt64(held), ordering: .relaxed)
        if held < count {
            try install(globalFirst: first, count: count, payload: payload, expected: .inflightBackground, onFaultThread: false)
        }
    }

    /// Zero pages mapped ahead (claimed: in flight): each whose alias page
    /// reads zero already (a preallocated file) is held like a streamed page,
    /// with no write and no CONTINUE; returns how many. The others stay in
    /// flight for `install` (zeros written, then mapped).
    ///
    /// The pages are claimed by this thread, so nobody else writes their alias
    /// (a guest cannot: they are not mapped; a REMOVE only makes them holes):
    /// they are read before `pages.lock` is taken, which the fault thread wants
    /// for every fault. Not read at all where the file held no data before it
    /// was preallocated (`SharedAlias.zeroAtStart`): a page the source calls
    /// zero was never written here in pure postcopy (a reply cut short writes
    /// only pages that hold data at the source, and they stay so), unless a
    /// REMOVE punched it out of the file since (`mincore`).
    func holdZeros(globalFirst first: Int, count: Int) -> Int {
        assert(backgroundThread.isCurrent)
        var held = 0
        let base = UnsafeMutableRawPointer(mutating: aliasBuffer(globalFirst: first, count: count).baseAddress!)
        let known = knownZero(globalFirst: first, count: count, alias: base)
        // Per page: its alias reads zero (nil: every one does).
        let zero = known?.allSatisfy({ $0 }) == true ? nil
            : (0..<count).map { known?[$0] == true || cpc_is_zero(base + $0 * pageSize, pageSize) != 0 }
        removeGuard.withLock {
            held = pages.lock.withLock { holdRunLocked(first, count, zero: zero) }
        }
        counters.streamedPagesHeld.add(UInt64(held), ordering: .relaxed)
        return held
    }

    /// Per page of [first, first+count) (inside one guest region, its alias
    /// at `alias`): known to read zero without a look, since its region's file
    /// held no data before preallocation and the page is still in the page
    /// cache. (A REMOVE punched the others out of the file, which
    /// UFFDIO_CONTINUE cannot map, EFAULT: they are read, and the read fault
    /// allocates them again.) Nil when no page of the run can be known so.
    private func knownZero(globalFirst first: Int, count: Int, alias: UnsafeMutableRawPointer) -> [Bool]? {
        guard case .continue(_, let files) = installer else { return nil }
        let i = map.regionIndex(ofGlobal: first)
        guard files[i].zeroAtStart, map.regionIndex(ofGlobal: first + count - 1) == i else { return nil }
        var resident = [UInt8](repeating: 0, count: count)
        guard mincore(alias, count * pageSize, &resident) == 0 else { return nil }
        return resident.map { $0 & 1 != 0 }
    }

    /// Under `pages.lock` (and the remove guard): holds page p, claimed for
    /// the stream, when it is still in flight, was not removed meanwhile, no
    /// guest waits on it (a fault recorded, an async waiter) and `also` holds
    /// (checked last). Returns whether it did.
    private func holdLocked(_ p: Int, if also: () -> Bool = { true }) -> Bool {
        guard pages.state(p) == .inflightBackground, !pages.wasRemovedInflight(p), !pages.hasWaiter(p),
              apfWaiters.isEmpty || apfWaiters[p] == nil, also() else {
            return false
        }
        pages.set(p, .clean)
        return true
    }

    /// Under `pages.lock`: holds each page of [first, first+count) that
    /// `holdLocked` allows (`zero`: and whose alias reads zero, by offset in
    /// the run), and notes their blocks once each. Returns how many it held.
    private func holdRunLocked(_ first: Int, _ count: Int, zero: [Bool]? = nil) -> Int {
        var held = 0
        var block = -1..<(-1)
        for p in first..<(first + count) where holdLocked(p, if: { zero?[p - first] ?? true }) {
            held += 1
            if !block.contains(p) {
                block = heldBlock(p)
                pages.heldBlocks.insert(block.lowerBound)
            }
        }
        return held
    }

    /// Releases the blocks whose every page is in (held or present): their
    /// held pages are settled, then the block is unregistered. Returns whether
    /// blocks are left (a page of theirs missing, in flight or zero).
    func releaseFilledBlocks() -> Bool {
        assert(backgroundThread.isCurrent)
        var ready: [Range<Int>] = []
        var done = SettledPages()
        let left: Bool = pages.lock.withLock {
            for s in Array(pages.heldBlocks) {
                let b = heldBlock(s)
                // The usual reasons a block waits first, by memchr; then every page.
                guard !pages.has(.missing, in: b), !pages.has(.inflightBackground, in: b),
                      b.allSatisfy({ let st = pages.state($0); return st == .clean || st == .present }) else { continue }
                var p = b.lowerBound
                while let c = pages.next(.clean, from: p), c < b.upperBound {
                    let n = pages.runLength(from: c, in: .clean, end: b.upperBound)
                    settleCleanRunLocked(c, n, into: &done)
                    p = c + n
                }
                pages.heldBlocks.remove(s)
                ready.append(b)
            }
            return !pages.heldBlocks.isEmpty
        }
        guard !ready.isEmpty else { return left }
        // Settled first: a fault in between finds them present (mapped, woken).
        finishSettling(done, onFaultThread: false)
        for b in ready {
            let a = map.address(ofGlobal: b.lowerBound)
            streamReleased.store(true, ordering: .releasing)
            do { try uffd.unregisterAndWake(a..<(a + UInt64(b.count * pageSize))) } catch {
                // Still registered: faults on its pages map them as present pages.
                logger.warning("unregistering \(b.count) streamed pages at 0x\(String(a, radix: 16)) failed: \(error)")
            }
        }
        counters.streamedPagesReleased.add(UInt64(done.pages), ordering: .relaxed)
        return left
    }

    /// At the stream's end: blocks that cannot leave (a zero page removed
    /// behind the zero pass, say) give up; their held pages are mapped by
    /// CONTINUE from `cleanCursor` on (`installAhead(.clean)`). True when
    /// there is such mapping to do.
    func finishHeldBlocks(cleanCursor: inout Int) -> Bool {
        guard holdsStreamedPages, releaseFilledBlocks() else { return false }
        pages.lock.withLock { pages.heldBlocks.removeAll() }
        cleanCursor = 0
        return true
    }
}
