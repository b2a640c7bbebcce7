/// One bit per page, least significant bit first in each byte (the layout of
/// the wire's zero map).
public struct PageBitmap: Sendable, Equatable {
    public private(set) var bytes: [UInt8]

    public init(pages: Int) { bytes = [UInt8](repeating: 0, count: (pages + 7) / 8) }

    init(bytes: [UInt8]) { self.bytes = bytes }

    public func contains(_ page: Int) -> Bool { bytes[page >> 3] & (1 << UInt8(page & 7)) != 0 }

    public mutating func insert(_ page: Int) { bytes[page >> 3] |= 1 << UInt8(page & 7) }

    /// Pages set.
    public var count: Int { bytes.reduce(0) { $0 + $1.nonzeroBitCount } }
}
