import PostcopyCore
import PostcopyWire

/// What the destination learned from the handshake.
public struct SessionInfo: Sendable {
    public var welcome: Welcome
    public var table: RegionTable
    public init(welcome: Welcome) {
        self.welcome = welcome
        table = RegionTable(pageSize: Int(welcome.pageSize), regions: welcome.regions)
    }
}

/// One prioritized fetch channel. The destination submits page requests and
/// drains completions; the channel never decides what to fetch. Over TCP this is
/// one connection answered by the source; over RDMA it will be one QP issuing
/// one-sided READs (the source CPU does nothing per page).
public protocol PageChannel: AnyObject, Sendable {
    /// Readable when completions may be ready (for the caller's epoll set).
    var pollDescriptor: Int32 { get }
    /// Queues a fetch. Must not block for long: callers bound their own window.
    func submit(_ request: PageRequest) throws(TransportError)
    /// Queues several fetches, in order (one write where the transport can).
    func submit(batch requests: [PageRequest]) throws(TransportError)
    /// Queues fetches of scattered runs (consecutive ids, one class, within
    /// `GatherRequest`'s limits) as one gather where the source answers
    /// gathers (`canGather`), else as a batch. Completions come per run.
    func submit(gather requests: [PageRequest]) throws(TransportError)
    /// Whether `submit(gather:)` sends one request and gets one reply.
    var canGather: Bool { get }
    /// Whether it does so for class `precopy` too, before the pause.
    var canGatherPrecopy: Bool { get }
    /// Delivers every completion available now, without blocking. The payload
    /// (empty when the pages are zero) is valid only during the callback.
    /// Returns how many completions were delivered.
    func drainCompletions(_ body: (PageDataHeader, UnsafeRawBufferPointer) throws(TransportError) -> Void) throws(TransportError) -> Int
    /// Bytes this channel put on and took off the wire (headers included).
    var bytesSent: UInt64 { get }
    var bytesReceived: UInt64 { get }
    /// True when completions must be polled (`drainCompletions`) while requests
    /// are in flight rather than waited for on `pollDescriptor` (a busy-polled
    /// RDMA completion queue).
    var busyPoll: Bool { get }
    var suggestedWindow: Int? { get }
    /// Lets replies' payloads be received straight into place (see
    /// `PagePlacement`); nil: into the channel's own buffer. A transport that
    /// cannot place (or does not need to) ignores it.
    func setPlacement(_ placement: PagePlacement?)
}

extension PageChannel {
    public func submit(batch requests: [PageRequest]) throws(TransportError) {
        for r in requests { try submit(r) }
    }
    public func submit(gather requests: [PageRequest]) throws(TransportError) { try submit(batch: requests) }
    public var canGather: Bool { false }
    public var canGatherPrecopy: Bool { false }
    public var busyPoll: Bool { false }
    public func setPlacement(_ placement: PagePlacement?) {}
    /// How many background requests to keep in flight when not configured.
    public var suggestedWindow: Int? { nil }
}

/// Priority of a channel: demand pages must never queue behind background data.
public enum ChannelKind: Sendable {
    case demand
    case background
}

/// A connection to a source, however pages travel. The destination calls
/// `connect` once, then `openChannel` for each priority, the control calls
/// (zero map, device state) before streaming, and `complete` at the end.
public protocol Transport: AnyObject, Sendable {
    var name: String { get }
    func connect() throws(TransportError) -> SessionInfo
    func openChannel(_ kind: ChannelKind) throws(TransportError) -> PageChannel
    func fetchZeroMap(region: UInt16, firstPage: UInt64, pageCount: UInt64) throws(TransportError) -> ZeroMap
    /// The device state; waits (up to `timeoutMs`) until the source guest paused.
    func fetchDeviceState(timeoutMs: Int32) throws(TransportError) -> [UInt8]
    /// xxh64 of each page, as the source's RAM was at pause.
    func fetchPageDigests(region: UInt16, firstPage: UInt64, pageCount: UInt32) throws(TransportError) -> [UInt64]
    func complete(_ c: Complete) throws(TransportError) -> CompleteAck
    /// The pages of precopy pass `pass` (`PrecopyPassRequest`; the source
    /// must offer `.precopy`): waits for the operator's start, and for the
    /// pause when the source decides to stop (the answer is then final).
    func fetchDirtySet(pass: UInt32) throws(TransportError) -> PrecopySet
    /// After a broken connection: connects again, rejoins the same session
    /// (re-authenticating), and returns fresh channels (demand, background).
    /// The old channels are closed.
    func reconnect() throws(TransportError) -> (demand: PageChannel, background: PageChannel)
    /// Bytes put on and taken off the wire so far, every channel and header included.
    var bytesOnWire: (sent: UInt64, received: UInt64) { get }
    /// Whether the stream is encrypted (`StreamEncryption`), and the frame
    /// bytes encrypted (sent) and decrypted (received) so far.
    var encrypted: Bool { get }
    var bytesThroughCipher: (encrypted: UInt64, decrypted: UInt64) { get }
    func close()
}

extension Transport {
    public var encrypted: Bool { false }
    public var bytesThroughCipher: (encrypted: UInt64, decrypted: UInt64) { (0, 0) }

    public func fetchDirtySet(pass: UInt32) throws(TransportError) -> PrecopySet {
        throw .unavailable("the \(name) transport does not copy in precopy passes")
    }

    /// `complete`, and when the connection was cut after the last page and
    /// `reconnectingOnce` allows it, once more after a reconnect: the source
    /// keeps the session, so there is still someone to confirm to.
    public func complete(_ c: Complete, reconnectingOnce: Bool) throws(TransportError) -> CompleteAck {
        do { return try complete(c) } catch where error.isConnectionLoss && reconnectingOnce {
            _ = try reconnect()
            return try complete(c)
        }
    }

    /// The zero map of every region, in chunks the source accepts.
    public func fetchWholeZeroMap(_ table: RegionTable) throws(TransportError) -> [ZeroMap] {
        var maps: [ZeroMap] = []
        for c in Self.chunks(table, maxPages: WireProtocol.maxZeroMapPages) {
            maps.append(try fetchZeroMap(region: c.region, firstPage: c.first, pageCount: c.count))
        }
        return maps
    }

    /// The xxh64 of every page of every region, in order, in chunks the source accepts.
    public func fetchAllPageDigests(_ table: RegionTable) throws(TransportError) -> [UInt64] {
        var all: [UInt64] = []
        for c in Self.chunks(table, maxPages: UInt64(PageDigests.maxPages)) {
            all += try fetchPageDigests(region: c.region, firstPage: c.first, pageCount: UInt32(c.count))
        }
        return all
    }

    /// Every region of `table` cut into runs of at most `maxPages` pages, in order.
    static func chunks(_ table: RegionTable, maxPages: UInt64) -> [(region: UInt16, first: UInt64, count: UInt64)] {
        var out: [(region: UInt16, first: UInt64, count: UInt64)] = []
        for i in 0..<table.regions.count {
            let pages = UInt64(table.pageCount(region: i))
            var first: UInt64 = 0
            while first < pages {
                let n = min(pages - first, maxPages)
                out.append((UInt16(i), first, n))
                first += n
            }
        }
        return out
    }
}

/// Which transport to use, as the CLI's `--transport` names it.
public enum TransportKind: String, Sendable, CaseIterable {
    case tcp
    case rdma
    case auto
}
