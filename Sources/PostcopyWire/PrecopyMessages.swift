/// Asks the source for the pages to copy in precopy pass `pass` (from 1):
/// pass 1 is every page that holds data, a later pass the pages written since
/// the previous one. The source protects those pages against writes before it
/// answers (`DirtySet`), so any page read after the answer and written later is
/// in the next set. Sent on the main connection with nothing in flight on it.
public struct PrecopyPassRequest: Sendable, Equatable {
    public var pass: UInt32
    public init(pass: UInt32) { self.pass = pass }
}

/// The source's answer to a `PrecopyPassRequest`: the pages of one pass (or,
/// `isFinal`, the pages written since the last pass, scanned after the guest
/// paused: every page a destination holds from a precopy pass and finds here
/// is stale). Global page numbers (the region table's order); one or more
/// chunks of consecutive page ranges, the last flagged `isLastChunk`. On the
/// wire a chunk is runs or a bitmap, whichever is smaller.
public struct DirtySet: Sendable, Equatable {
    /// Pages one chunk may cover (its bitmap is then 512 KiB).
    public static let maxPagesPerChunk: UInt64 = 1 << 22
    public var pass: UInt32
    public var isFinal: Bool
    public var isLastChunk: Bool
    /// The chunk covers pages [firstPage, firstPage + pageCount).
    public var firstPage: UInt64
    public var pageCount: UInt64
    /// Sorted, disjoint, non-empty runs inside the chunk.
    public var runs: [Range<UInt64>]
    /// The source's switchover decision in words (empty until it decided).
    public var decision: String

    public init(pass: UInt32, isFinal: Bool, isLastChunk: Bool, firstPage: UInt64, pageCount: UInt64,
                runs: [Range<UInt64>], decision: String = "") {
        self.pass = pass
        self.isFinal = isFinal
        self.isLastChunk = isLastChunk
        self.firstPage = firstPage
        self.pageCount = pageCount
        self.runs = runs
        self.decision = decision
    }

    /// Pages in the runs.
    public var dirtyPages: UInt64 { runs.reduce(0) { $0 + UInt64($1.count) } }
}

extension Codec {
    static func encodeDirtySet(_ w: inout ByteWriter, _ d: DirtySet) {
        let bitmapBytes = Int((d.pageCount + 7) / 8)
        let runBytes = 4 + d.runs.count * 8
        let bitmap = bitmapBytes < runBytes
        w.u32(d.pass)
        w.u8((d.isFinal ? 1 : 0) | (d.isLastChunk ? 2 : 0) | (bitmap ? 4 : 0))
        w.u64(d.firstPage)
        w.u64(d.pageCount)
        w.string(d.decision)
        if bitmap {
            var bits = [UInt8](repeating: 0, count: bitmapBytes)
            for r in d.runs {
                for p in r { let i = Int(p - d.firstPage); bits[i >> 3] |= 1 << UInt8(i & 7) }
            }
            w.raw(bits)
        } else {
            w.u32(UInt32(d.runs.count))
            for r in d.runs {
                w.u32(UInt32(r.lowerBound - d.firstPage))
                w.u32(UInt32(r.count))
            }
        }
    }

    static func decodeDirtySet(_ r: inout ByteReader) throws(WireError) -> DirtySet {
        let pass = try r.u32("dirtySet.pass")
        let flags = try r.u8("dirtySet.flags")
        guard flags & ~7 == 0 else { throw .invalid(field: "dirtySet.flags", reason: "unknown bits 0x\(String(flags, radix: 16))") }
        let first = try r.u64("dirtySet.firstPage")
        let count = try r.u64("dirtySet.pageCount")
        guard count >= 1, count <= DirtySet.maxPagesPerChunk, first <= UInt64.max - count else {
            throw .invalid(field: "dirtySet.pageCount", reason: "\(count) pages at \(first) (1...\(DirtySet.maxPagesPerChunk) per chunk)")
        }
        let decision = try r.string("dirtySet.decision", maxLength: 1024)
        var runs: [Range<UInt64>] = []
        if flags & 4 != 0 {
            let n = Int((count + 7) / 8)
            guard r.remaining == n else { throw .invalid(field: "dirtySet.bitmap", reason: "\(r.remaining) bytes for \(count) pages") }
            let bits = try r.bytes(n, "dirtySet.bitmap")
            if count % 8 != 0, bits[n - 1] >> UInt8(count % 8) != 0 {
                throw .invalid(field: "dirtySet.bitmap", reason: "bits set past the chunk's last page")
            }
            var i: UInt64 = 0
            while i < count {
                guard bits[Int(i >> 3)] & (1 << UInt8(i & 7)) != 0 else { i += 1; continue }
                let s = i
                while i < count, bits[Int(i >> 3)] & (1 << UInt8(i & 7)) != 0 { i += 1 }
                runs.append((first + s)..<(first + i))
            }
        } else {
            let n = try r.u32("dirtySet.runCount")
            guard UInt64(n) <= (count + 1) / 2, r.remaining == Int(n) * 8 else {
                throw .invalid(field: "dirtySet.runs", reason: "\(n) runs in \(r.remaining) bytes for \(count) pages")
            }
            var end: UInt64 = 0
            for _ in 0..<n {
                let off = UInt64(try r.u32("dirtySet.run.offset"))
                let len = UInt64(try r.u32("dirtySet.run.count"))
                // Sorted, disjoint, not touching (the encoder merges), inside the chunk.
                guard len >= 1, off >= end, off + len <= count, runs.isEmpty || off > end else {
                    throw .invalid(field: "dirtySet.run", reason: "\(len) pages at \(off): empty, out of order, overlapping or past the chunk's \(count) pages")
                }
                runs.append((first + off)..<(first + off + len))
                end = off + len
            }
        }
        return DirtySet(pass: pass, isFinal: flags & 1 != 0, isLastChunk: flags & 2 != 0, firstPage: first, pageCount: count,
                        runs: runs, decision: decision)
    }
}
