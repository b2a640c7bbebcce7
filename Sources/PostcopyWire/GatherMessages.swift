/// One run of a gather: `pageCount` pages from `pageOffset` of `region`.
/// In a reply, `isZero` says the run was all zero at the source (no payload).
public struct GatherRun: Sendable, Equatable, Hashable {
    public var region: UInt16
    public var pageOffset: UInt64
    public var pageCount: UInt32
    public var isZero: Bool
    public init(region: UInt16, pageOffset: UInt64, pageCount: UInt32, isZero: Bool = false) {
        self.region = region
        self.pageOffset = pageOffset
        self.pageCount = pageCount
        self.isZero = isZero
    }
    /// Bytes of one run on the wire: region u16, flags u8, offset u64, count u32.
    public static let encodedSize = 2 + 1 + 8 + 4
}

/// Many scattered runs in one request and one reply (a replayed working set,
/// hot pages): run i is request `firstRequestID + i` of `pageClass`, so a
/// receiver settles each run as it would a reply to an ordinary request, and a
/// reconnect re-requests the runs one by one. At most
/// `WireProtocol.maxGatherRuns` runs and `WireProtocol.maxPagesPerRequest`
/// pages in all.
public struct GatherRequest: Sendable, Equatable {
    public var firstRequestID: UInt64
    public var pageClass: PageClass
    public var runs: [GatherRun]
    public init(firstRequestID: UInt64, pageClass: PageClass, runs: [GatherRun]) {
        self.firstRequestID = firstRequestID
        self.pageClass = pageClass
        self.runs = runs
    }

    /// Run i as the ordinary request it stands for.
    public var requests: [PageRequest] {
        runs.enumerated().map { i, r in
            PageRequest(requestID: firstRequestID &+ UInt64(i), region: r.region, pageClass: pageClass, pageOffset: r.pageOffset, pageCount: r.pageCount)
        }
    }

    /// The requests as one gather, when they can be (consecutive ids, one class,
    /// within the limits); nil otherwise.
    public init?(_ requests: [PageRequest]) {
        guard let first = requests.first, requests.count <= WireProtocol.maxGatherRuns,
              requests.reduce(0, { $0 + Int($1.pageCount) }) <= Int(WireProtocol.maxPagesPerRequest) else { return nil }
        for (i, r) in requests.enumerated() where r.requestID != first.requestID &+ UInt64(i) || r.pageClass != first.pageClass { return nil }
        self.init(firstRequestID: first.requestID, pageClass: first.pageClass,
                  runs: requests.map { GatherRun(region: $0.region, pageOffset: $0.pageOffset, pageCount: $0.pageCount) })
    }
}

/// The reply to a gather: the runs echoed, each flagged zero or not, then the
/// pages of the non-zero runs back to back, in run order.
public struct GatherData: Sendable, Equatable {
    public var firstRequestID: UInt64
    public var pageClass: PageClass
    /// As `PageDataHeader.sourcePaused`.
    public var sourcePaused: Bool
    public var runs: [GatherRun]
    public init(firstRequestID: UInt64, pageClass: PageClass, sourcePaused: Bool, runs: [GatherRun]) {
        self.firstRequestID = firstRequestID
        self.pageClass = pageClass
        self.sourcePaused = sourcePaused
        self.runs = runs
    }

    /// Bytes before the runs in the body: first id u64, class u8, flags u8, run count u16.
    public static let fixedSize = 8 + 1 + 1 + 2

    /// Run i as the page reply it stands for.
    public func header(_ i: Int) -> PageDataHeader {
        let r = runs[i]
        return PageDataHeader(requestID: firstRequestID &+ UInt64(i), region: r.region, pageClass: pageClass, isZero: r.isZero,
                              sourcePaused: sourcePaused, pageOffset: r.pageOffset, pageCount: r.pageCount)
    }

    /// Payload bytes: the pages of the non-zero runs.
    public func payloadBytes(pageSize: Int) -> Int {
        runs.reduce(0) { $0 + ($1.isZero ? 0 : Int($1.pageCount) * pageSize) }
    }
}

extension Codec {
    static func encodeGatherRuns(_ w: inout ByteWriter, _ runs: [GatherRun]) {
        w.u16(UInt16(runs.count))
        for r in runs {
            w.u16(r.region)
            w.u8(r.isZero ? 1 : 0)
            w.u64(r.pageOffset)
            w.u32(r.pageCount)
        }
    }

    static func encodeGatherDataHead(_ w: inout ByteWriter, _ g: GatherData) {
        w.u64(g.firstRequestID)
        w.u8(g.pageClass.rawValue)
        w.u8(g.sourcePaused ? 2 : 0)
        encodeGatherRuns(&w, g.runs)
    }

    /// The frame header and everything of a gather reply before its pages, so
    /// a server can send the pages straight from guest memory.
    public static func encodeGatherDataPrefix(_ g: GatherData, payloadLength: Int) -> [UInt8] {
        var w = ByteWriter(capacity: WireProtocol.headerSize + GatherData.fixedSize + g.runs.count * GatherRun.encodedSize)
        w.u16(WireProtocol.frameMagic)
        w.u8(MessageType.gatherData.rawValue)
        w.u8(0)
        w.u32(0)
        encodeGatherDataHead(&w, g)
        w.patchU32(at: 4, UInt32(w.bytes.count - WireProtocol.headerSize + payloadLength))
        return w.bytes
    }

    /// Bytes of a gather reply's body before its pages, from the first
    /// `GatherData.fixedSize` bytes of the body (nil: fewer bytes than that).
    public static func gatherDataHeadSize(_ body: UnsafeRawBufferPointer) -> Int? {
        guard body.count >= GatherData.fixedSize else { return nil }
        let n = Int(body[GatherData.fixedSize - 2]) | Int(body[GatherData.fixedSize - 1]) << 8
        return GatherData.fixedSize + n * GatherRun.encodedSize
    }

    static func decodeGatherRuns(_ r: inout ByteReader, _ what: StaticString, replies: Bool) throws(WireError) -> [GatherRun] {
        let n = Int(try r.u16(what))
        guard n >= 1, n <= WireProtocol.maxGatherRuns else {
            throw .invalid(field: "\(what)", reason: "\(n) runs (1...\(WireProtocol.maxGatherRuns) allowed)")
        }
        var runs: [GatherRun] = []
        runs.reserveCapacity(n)
        var pages = 0
        for _ in 0..<n {
            let region = try r.u16("gather.run.region")
            let flags = try r.u8("gather.run.flags")
            guard flags & ~(replies ? 1 : 0) == 0 else { throw .invalid(field: "gather.run.flags", reason: "unknown bits 0x\(String(flags, radix: 16))") }
            let offset = try r.u64("gather.run.pageOffset")
            let count = try r.u32("gather.run.pageCount")
            guard count >= 1, count <= WireProtocol.maxPagesPerRequest else {
                throw .invalid(field: "gather.run.pageCount", reason: "\(count) pages (1...\(WireProtocol.maxPagesPerRequest) allowed)")
            }
            pages += Int(count)
            runs.append(GatherRun(region: region, pageOffset: offset, pageCount: count, isZero: flags & 1 != 0))
        }
        guard pages <= Int(WireProtocol.maxPagesPerRequest) else {
            throw .invalid(field: "\(what)", reason: "\(pages) pages in all (\(WireProtocol.maxPagesPerRequest) allowed)")
        }
        return runs
    }

    /// The head of a gather reply (everything before its pages), checked as `decode` checks it.
    public static func decodeGatherDataHead(_ bytes: UnsafeRawBufferPointer) throws(WireError) -> GatherData {
        var r = ByteReader(bytes)
        let g = try decodeGatherDataHead(&r)
        try r.expectEnd("gatherData head")
        return g
    }

    static func decodeGatherDataHead(_ r: inout ByteReader) throws(WireError) -> GatherData {
        let id = try r.u64("gatherData.firstRequestID")
        let cls = try pageClass(try r.u8("gatherData.class"))
        let flags = try r.u8("gatherData.flags")
        guard flags & ~2 == 0 else { throw .invalid(field: "gatherData.flags", reason: "unknown bits 0x\(String(flags, radix: 16))") }
        let runs = try decodeGatherRuns(&r, "gatherData.runCount", replies: true)
        return GatherData(firstRequestID: id, pageClass: cls, sourcePaused: flags & 2 != 0, runs: runs)
    }

    static func decodeGatherRequest(_ r: inout ByteReader) throws(WireError) -> GatherRequest {
        let id = try r.u64("gatherRequest.firstRequestID")
        let cls = try pageClass(try r.u8("gatherRequest.class"))
        // Any class: the source refuses precopy gathers outside a pass (`serveGather`).
        return GatherRequest(firstRequestID: id, pageClass: cls, runs: try decodeGatherRuns(&r, "gatherRequest.runCount", replies: false))
    }
}
