import PostcopyWire

/// Translates between addresses of the space the uffd serves and global source
/// page numbers, over regions that passed `GuestRegion.layoutProblem`.
struct RegionMap: Sendable {
    /// Sorted by source page.
    let regions: [GuestRegion]
    let pageSize: Int

    init(_ regions: [GuestRegion], pageSize: Int) {
        self.regions = regions.sorted { $0.sourceFirstPage < $1.sourceFirstPage }
        self.pageSize = pageSize
    }

    /// The global page at `address`, or nil outside every region.
    func globalPage(_ address: UInt64) -> Int? {
        for r in regions where r.range.contains(address) {
            return r.sourceFirstPage + Int((address - r.base) / UInt64(pageSize))
        }
        return nil
    }

    /// The guest region holding global page p.
    func region(ofGlobal p: Int) -> GuestRegion { regions[regionIndex(ofGlobal: p)] }

    /// The index in `regions` of the region holding global page p.
    func regionIndex(ofGlobal p: Int) -> Int { regions.lastIndex(startingAtOrBefore: p) { $0.sourceFirstPage } }

    /// Where global page p lives in the served address space.
    func address(ofGlobal p: Int) -> UInt64 {
        let r = region(ofGlobal: p)
        return r.base + UInt64((p - r.sourceFirstPage) * pageSize)
    }
}
