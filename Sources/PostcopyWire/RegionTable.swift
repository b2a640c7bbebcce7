/// The region table both sides agree on in the handshake; validates page ranges
/// so no request or response can address memory outside a region.
public struct RegionTable: Sendable, Equatable {
    public let pageSize: Int
    public let regions: [RegionDescriptor]
    /// Index of each region's first page in a global page numbering.
    public let firstGlobalPage: [Int]
    public let totalPages: Int

    public init(pageSize: Int, regions: [RegionDescriptor]) {
        self.pageSize = pageSize
        self.regions = regions
        var first: [Int] = []
        var total = 0
        for r in regions {
            first.append(total)
            total += Int(r.size) / pageSize
        }
        firstGlobalPage = first
        totalPages = total
    }

    public func pageCount(region: Int) -> Int { Int(regions[region].size) / pageSize }

    /// Throws unless [pageOffset, pageOffset + count) lies inside `region`.
    public func validate(region: UInt16, pageOffset: UInt64, pageCount: UInt64) throws(WireError) {
        guard Int(region) < regions.count else {
            throw .invalid(field: "region", reason: "region \(region) does not exist (\(regions.count) regions)")
        }
        let pages = UInt64(self.pageCount(region: Int(region)))
        let (end, overflow) = pageOffset.addingReportingOverflow(pageCount)
        guard !overflow, pageCount > 0, end <= pages else {
            throw .invalid(field: "page range", reason: "pages \(pageOffset)..<\(pageOffset &+ pageCount) outside region \(region) of \(pages) pages")
        }
    }

    /// Maps a global page number to (region, page offset).
    public func locate(globalPage: Int) -> (region: Int, page: Int) {
        let r = firstGlobalPage.lastIndex(startingAtOrBefore: globalPage) { $0 }
        return (r, globalPage - firstGlobalPage[r])
    }
}
