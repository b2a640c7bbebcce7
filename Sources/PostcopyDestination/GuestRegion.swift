import PostcopyWire

/// Where a run of source pages lives in the address space the uffd serves:
/// `size` bytes at `base` hold source pages `sourceFirstPage...` (global numbering).
/// Standalone, one per source region; with a VMM, one per region it handed over.
public struct GuestRegion: Sendable, Equatable {
    public var base: UInt64
    public var size: Int
    public var sourceFirstPage: Int
    public init(base: UInt64, size: Int, sourceFirstPage: Int) {
        self.base = base
        self.size = size
        self.sourceFirstPage = sourceFirstPage
    }
    public var range: Range<UInt64> { base..<(base + UInt64(size)) }

    /// Why `regions` cannot serve `table`, or nil: they must tile the source's
    /// pages exactly (sorted, no gap, no overlap in either space, page-aligned).
    public static func layoutProblem(_ regions: [GuestRegion], table: RegionTable) -> String? {
        let ps = table.pageSize
        var next = 0
        for r in regions.sorted(by: { $0.sourceFirstPage < $1.sourceFirstPage }) {
            guard r.size > 0 else { return "a region of size 0 at 0x\(String(r.base, radix: 16))" }
            guard r.size % ps == 0, r.base % UInt64(ps) == 0 else {
                return "region at 0x\(String(r.base, radix: 16)) (\(r.size) bytes) is not aligned to the \(ps)-byte page size"
            }
            guard r.sourceFirstPage == next else {
                return r.sourceFirstPage < next
                    ? "regions overlap in the source memory at byte offset \(r.sourceFirstPage * ps)"
                    : "no region covers source memory bytes \(next * ps)..<\(r.sourceFirstPage * ps)"
            }
            next += r.size / ps
            guard next <= table.totalPages else {
                return "region at 0x\(String(r.base, radix: 16)) ends at byte \(next * ps), beyond the source memory of \(table.totalPages * ps) bytes"
            }
        }
        guard next == table.totalPages else {
            return "regions cover \(next * ps) bytes but the source memory has \(table.totalPages * ps)"
        }
        let byAddress = regions.sorted { $0.base < $1.base }
        for (a, b) in zip(byAddress, byAddress.dropFirst()) where a.range.overlaps(b.range) {
            return "regions overlap in the address space at 0x\(String(b.base, radix: 16))"
        }
        return nil
    }
}
