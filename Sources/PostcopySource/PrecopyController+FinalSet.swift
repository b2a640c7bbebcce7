import CPostcopy
import PostcopyCore
import PostcopyTransport
import PostcopyWire
#if canImport(Glibc)
import Glibc
#endif

/// The sets `PrecopyController` hands out: the final dirty set after the
/// pause, and any set as the chunks of a `DirtySet` answer.
extension PrecopyController {
    /// The runs of `set` whose pages were not served.
    /// None for a destination that READs the pages itself (RDMA): this side
    /// cannot see what it fetched, and it fetches a whole set before asking
    /// for the next (it gets no "paused" flag to stop early).
    static func unserved(_ s: State, _ set: DirtyPages) -> [Range<Int>] {
        guard !s.readsRemotely else { return [] }
        let served = s.served
        var out: [Range<Int>] = []
        for r in set.runs {
            var p = r.lowerBound
            while p < r.upperBound {
                guard !served.contains(p) else { p += 1; continue }
                let s = p
                while p < r.upperBound, !served.contains(p) { p += 1 }
                out.append(s..<p)
            }
        }
        return out
    }

    /// After the pause: the final set (computed once; asked again after a
    /// reconnect, the same).
    func finalSet(_ pass: UInt32) throws(TransportError) -> [DirtySet] {
        let t0 = nowNanoseconds()
        let (tracker, everSent, tracked, unserved) = state.withLock {
            // A destination that READs pages itself may hold any tracked page.
            ($0.tracker, $0.readsRemotely ? nil : $0.everSent, $0.trackedUpTo, Self.unserved($0, $0.lastSet) + $0.notHandedOut.runs)
        }
        var runs: [Range<Int>] = []
        if let tracker {
            // Right after the pause, over all of RAM: on a thread at nice 10, so
            // that it never takes CPU from the device state on its way.
            let result = Locked<Result<[Range<Int>], TransportError>>(.success([]))
            PThread(name: "src-final-scan", priority: .low) { [self] in
                // Pages never tracked were never handed out: the destination has none of them.
                let r: Result<[Range<Int>], TransportError>
                do throws(SystemError) {
                    let written = try tracker.collect(pages: 0..<tracked).runs
                    r = Result { () throws(TransportError) in written + (try notResident(among: everSent, below: tracked)) }
                } catch {
                    r = .failure(.local(error))
                }
                result.withLock { $0 = r }
            }.join()
            runs = try result.withLock { $0 }.get() + unserved
        }
        let set = DirtyPages(runs: runs)
        return state.withLock { s in
            if s.decision == nil { s.decision = "paused by the operator" }
            s.finalPages = set.count
            s.finalScanNanoseconds = nowNanoseconds() - t0
            let c = chunks(set, pass: pass, final: true, decision: s.decision!)
            s.final = c
            return c
        }
    }

    /// The pages of `pages` (nil: every page below `end`) that are not in memory any more: punched out of
    /// the memory file (a balloon, a discard) since they were sent, so zero
    /// now, which write-protect does not report as a write. `mincore` answers
    /// from the page tables for mapped pages (every page sent was read through
    /// this mapping) and looks the others up in the page cache; a page
    /// swapped out counts too (fetched again: never wrong, only slower).
    private func notResident(among pages: PageBitmap?, below end: Int) throws(TransportError) -> [Range<Int>] {
        let total = memory.table.totalPages
        let vec = UnsafeMutablePointer<UInt8>.allocate(capacity: total)
        defer { vec.deallocate() }
        guard mincore(memory.mapping.base, memory.mapping.length, vec) == 0 else {
            throw .local(SystemError("mincore of guest RAM", errno: errno))
        }
        var out: [Range<Int>] = []
        for p in 0..<min(total, end) where vec[p] & 1 == 0 && pages?.contains(p) != false { out.append(p..<(p + 1)) }
        return out
    }

    /// `set` as chunks covering every page, in order.
    func chunks(_ set: DirtyPages, pass: UInt32, final: Bool, decision: String = "") -> [DirtySet] {
        let total = UInt64(memory.table.totalPages)
        var out: [DirtySet] = []
        var first: UInt64 = 0
        var i = 0
        while first < total {
            let count = min(DirtySet.maxPagesPerChunk, total - first)
            let end = first + count
            var runs: [Range<UInt64>] = []
            while i < set.runs.count, UInt64(set.runs[i].lowerBound) < end {
                let r = set.runs[i]
                let lo = max(UInt64(r.lowerBound), first), hi = min(UInt64(r.upperBound), end)
                runs.append(lo..<hi)
                if UInt64(r.upperBound) > end { break }  // goes on in the next chunk
                i += 1
            }
            out.append(DirtySet(pass: pass, isFinal: final, isLastChunk: end == total, firstPage: first, pageCount: count,
                                runs: runs, decision: decision))
            first = end
        }
        return out
    }
}
