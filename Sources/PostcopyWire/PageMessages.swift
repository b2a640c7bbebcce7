/// A request for `pageCount` pages starting at `pageOffset` of `region`.
/// Self-describing: replaying it on a new connection asks for the same pages.
public struct PageRequest: Sendable, Equatable, Hashable {
    public var requestID: UInt64
    public var region: UInt16
    public var pageClass: PageClass
    public var pageOffset: UInt64
    public var pageCount: UInt32
    public init(requestID: UInt64, region: UInt16, pageClass: PageClass, pageOffset: UInt64, pageCount: UInt32) {
        self.requestID = requestID
        self.region = region
        self.pageClass = pageClass
        self.pageOffset = pageOffset
        self.pageCount = pageCount
    }
}

/// Header of a page response; the payload (pageCount pages, or nothing when
/// `isZero`) follows it in the same frame.
public struct PageDataHeader: Sendable, Equatable {
    public var requestID: UInt64
    public var region: UInt16
    public var pageClass: PageClass
    public var isZero: Bool
    /// The source guest was paused when this reply was read, or (a precopy
    /// reply) its pause is decided (flag bit 1): a destination copying in
    /// precopy passes stops asking for more and asks for the final dirty set.
    public var sourcePaused: Bool
    public var pageOffset: UInt64
    public var pageCount: UInt32
    public init(requestID: UInt64, region: UInt16, pageClass: PageClass, isZero: Bool, sourcePaused: Bool = false,
                pageOffset: UInt64, pageCount: UInt32) {
        self.requestID = requestID
        self.region = region
        self.pageClass = pageClass
        self.isZero = isZero
        self.sourcePaused = sourcePaused
        self.pageOffset = pageOffset
        self.pageCount = pageCount
    }
    /// Bytes of the header inside the frame body.
    public static let encodedSize = 8 + 2 + 1 + 1 + 8 + 4
}

public struct ZeroMapRequest: Sendable, Equatable {
    public var region: UInt16
    public var firstPage: UInt64
    public var pageCount: UInt64
    public init(region: UInt16, firstPage: UInt64, pageCount: UInt64) {
        self.region = region
        self.firstPage = firstPage
        self.pageCount = pageCount
    }
}

/// Bit i set = page firstPage+i of region is all zeros at the source.
public struct ZeroMap: Sendable, Equatable {
    public var region: UInt16
    public var firstPage: UInt64
    public var pageCount: UInt64
    public var bits: [UInt8]
    public init(region: UInt16, firstPage: UInt64, pageCount: UInt64, bits: [UInt8]) {
        self.region = region
        self.firstPage = firstPage
        self.pageCount = pageCount
        self.bits = bits
    }
    public func isZero(_ i: Int) -> Bool { bits[i >> 3] & (1 << UInt8(i & 7)) != 0 }
}

/// Asks for the xxh64 of `pageCount` pages (at most `PageDigests.maxPages`).
public struct PageDigestRequest: Sendable, Equatable {
    public var region: UInt16
    public var firstPage: UInt64
    public var pageCount: UInt32
    public init(region: UInt16, firstPage: UInt64, pageCount: UInt32) {
        self.region = region
        self.firstPage = firstPage
        self.pageCount = pageCount
    }
}

/// xxh64 of each page of a range, as the source's RAM was when the guest paused.
public struct PageDigests: Sendable, Equatable {
    public static let maxPages: UInt32 = 65536
    public var region: UInt16
    public var firstPage: UInt64
    public var digests: [UInt64]
    public init(region: UInt16, firstPage: UInt64, digests: [UInt64]) {
        self.region = region
        self.firstPage = firstPage
        self.digests = digests
    }
}
