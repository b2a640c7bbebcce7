/// Which pages of frozen RAM are all zeros: the first half of the scan, ready
/// long before the digests (a destination streams only the other pages).
public struct ZeroPages: Sendable {
    public let pages: PageBitmap
    /// How many (counted once: servers ask for it with every batch).
    public let count: Int

    init(_ pages: PageBitmap) {
        self.pages = pages
        count = pages.count
    }

    public func contains(_ page: Int) -> Bool { pages.contains(page) }
}
