/// The wire protocol's constants and limits, shared by both sides.
public enum WireProtocol {
    /// First two bytes of every frame ("PC" little-endian).
    public static let frameMagic: UInt16 = 0x4350
    /// Carried in Hello/Welcome so a stray connection from another protocol fails fast.
    public static let handshakeMagic: UInt64 = 0x5947_494D_5950_4350  // "PCPYMIGY"
    public static let version: UInt16 = 1
    /// Frame header: magic u16, type u8, flags u8, body length u32.
    public static let headerSize = 8
    /// Default bound on a frame body: 16 MiB of pages plus headers.
    public static let defaultMaxBody = 16 << 20 + 4096
    /// Largest page run one request may ask for.
    public static let maxPagesPerRequest: UInt32 = 4096
    /// Most runs one gather request may name (one reply's pages fit IOV_MAX iovecs).
    public static let maxGatherRuns = 1024
    public static let maxRegions = 1024
    /// Largest zero map one request may ask for, in pages: the source refuses
    /// more, the destination cuts its requests in runs of this.
    public static let maxZeroMapPages: UInt64 = 1 << 22
    /// Largest device-state chunk one reply carries (bytes): the destination asks
    /// for this much, the source sends at most this much.
    public static let maxDeviceStateChunk = 1 << 19
    /// How long a peer may take to send its hello, an authentication response or
    /// a welcome (ms).
    public static let handshakeTimeoutMs: Int32 = 30_000
    /// How long a control request (device state, digests, completion) may wait
    /// for its reply once the source guest paused (ms).
    public static let controlReplyTimeoutMs: Int32 = 60_000
}

/// Capabilities a peer may advertise in Hello / Welcome.
public struct Capabilities: OptionSet, Sendable, Hashable {
    public let rawValue: UInt64
    public init(rawValue: UInt64) { self.rawValue = rawValue }
    /// The peer understands the zero-page map (zero pages are never sent).
    public static let zeroMap = Capabilities(rawValue: 1 << 0)
    /// A separate urgent channel for demand pages (postcopy-preempt style).
    public static let urgentChannel = Capabilities(rawValue: 1 << 1)
    /// Reserved for the RDMA transport (region addresses + rkeys after the handshake).
    public static let rdmaRead = Capabilities(rawValue: 1 << 2)
    /// Reserved for authentication (challenge-response before any page).
    public static let authentication = Capabilities(rawValue: 1 << 3)
    /// The source copies RAM while its guest runs (precopy passes: `PrecopyPassRequest`,
    /// `DirtySet`, page requests of class `precopy` before the pause).
    public static let precopy = Capabilities(rawValue: 1 << 4)
    /// The source answers `GatherRequest`s (many scattered runs, one reply).
    public static let gather = Capabilities(rawValue: 1 << 5)
    /// Every frame after the authentication travels in AES-256-GCM records
    /// (asked for by the destination; a source in the other mode refuses it).
    public static let encryption = Capabilities(rawValue: 1 << 6)
    /// The source answers gathers of class `precopy` during a precopy pass
    /// (the later passes' scattered pages, a batch of runs per request).
    public static let precopyGather = Capabilities(rawValue: 1 << 7)
}

public enum MessageType: UInt8, Sendable, CaseIterable {
    case hello = 1
    case welcome = 2
    case error = 3
    case pageRequest = 4
    case pageData = 5
    case zeroMapRequest = 6
    case zeroMap = 7
    case deviceStateRequest = 8
    case deviceState = 9
    case complete = 10
    case completeAck = 11
    case pageDigestRequest = 12
    case pageDigests = 13
    case authChallenge = 14
    case authResponse = 15
    case rdmaRequest = 16
    case rdmaOffer = 17
    case precopyPassRequest = 18
    case dirtySet = 19
    case gatherRequest = 20
    case gatherData = 21
}

/// Which connection of a session this is. Demand pages travel on `.urgent`, so
/// they never queue behind background data on `.main`.
public enum ChannelRole: UInt8, Sendable {
    case main = 1
    case urgent = 2
}

/// Priority class of a page request: demand > prefetch > background > precopy.
public enum PageClass: UInt8, Sendable, CaseIterable {
    case demand = 1
    case prefetch = 2
    case background = 3
    /// A page of a precopy pass: read while the source guest may still run
    /// (after the source protected it against writes), so possibly rewritten
    /// since; the final dirty set says which.
    case precopy = 4

    /// Whether requests of this class travel on the main connection (background
    /// and precopy) rather than the urgent one (demand, prefetch).
    public var isStream: Bool { self == .background || self == .precopy }
}
