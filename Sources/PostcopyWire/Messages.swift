/// Protocol constants.
public enum Protocol {
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
}

/// Which connection of a session this is. Demand pages travel on `.urgent`, so
/// they never queue behind background data on `.main`.
public enum ChannelRole: UInt8, Sendable {
    case main = 1
    case urgent = 2
}

/// Priority class of a page request: demand > prefetch > background.
public enum PageClass: UInt8, Sendable, CaseIterable {
    case demand = 1
    case prefetch = 2
    case background = 3
}

/// An opaque, typed extension in the handshake (future: auth nonces, rkeys).
public struct HandshakeExtension: Sendable, Equatable {
    public var type: UInt16
    public var value: [UInt8]
    public init(type: UInt16, value: [UInt8]) {
        self.type = type
        self.value = value
    }
}

/// One guest-memory region as the source serves it. `sourceOffset` says where
/// the region lives in the source's memory file, so a one-sided transport (RDMA)
/// can address it without asking the source.
public struct RegionDescriptor: Sendable, Equatable {
    public var size: UInt64
    public var sourceOffset: UInt64
    public var name: String
    public init(size: UInt64, sourceOffset: UInt64, name: String) {
        self.size = size
        self.sourceOffset = sourceOffset
        self.name = name
    }
}

public struct Hello: Sendable, Equatable {
    public var version: UInt16 = Protocol.version
    public var role: ChannelRole
    public var capabilities: Capabilities
    /// 0 asks for a new session; otherwise joins (or, later, resumes) that session.
    public var sessionID: UInt64
    public var extensions: [HandshakeExtension] = []
    public init(role: ChannelRole, capabilities: Capabilities, sessionID: UInt64, extensions: [HandshakeExtension] = []) {
        self.role = role
        self.capabilities = capabilities
        self.sessionID = sessionID
        self.extensions = extensions
    }
}

public struct Welcome: Sendable, Equatable {
    public var version: UInt16 = Protocol.version
    public var pageSize: UInt32
    public var sessionID: UInt64
    public var capabilities: Capabilities
    public var regions: [RegionDescriptor]
    /// Digest of all guest RAM as served (see `MemoryDigest`).
    public var digest: UInt64
    public var deviceStateSize: UInt64
    public var extensions: [HandshakeExtension] = []
    public init(pageSize: UInt32, sessionID: UInt64, capabilities: Capabilities, regions: [RegionDescriptor],
                digest: UInt64, deviceStateSize: UInt64, extensions: [HandshakeExtension] = []) {
        self.pageSize = pageSize
        self.sessionID = sessionID
        self.capabilities = capabilities
        self.regions = regions
        self.digest = digest
        self.deviceStateSize = deviceStateSize
        self.extensions = extensions
    }
}

public enum ErrorCode: UInt16, Sendable {
    case protocolViolation = 1
    case outOfRange = 2
    case unsupportedVersion = 3
    case unknownSession = 4
    case internalError = 5
    case shuttingDown = 6
    case authenticationFailed = 7
    /// The source serves no RDMA (not configured, no device); the connection stays usable.
    case rdmaUnavailable = 8
}

public struct ErrorMessage: Sendable, Equatable {
    public var code: ErrorCode
    public var message: String
    public init(code: ErrorCode, message: String) {
        self.code = code
        self.message = message
    }
}

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
    public var pageOffset: UInt64
    public var pageCount: UInt32
    public init(requestID: UInt64, region: UInt16, pageClass: PageClass, isZero: Bool, pageOffset: UInt64, pageCount: UInt32) {
        self.requestID = requestID
        self.region = region
        self.pageClass = pageClass
        self.isZero = isZero
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

public struct DeviceStateRequest: Sendable, Equatable {
    public var offset: UInt64
    public var maxLength: UInt32
    public init(offset: UInt64, maxLength: UInt32) {
        self.offset = offset
        self.maxLength = maxLength
    }
}

public struct DeviceState: Sendable, Equatable {
    public var totalSize: UInt64
    public var offset: UInt64
    public var data: [UInt8]
    public init(totalSize: UInt64, offset: UInt64, data: [UInt8]) {
        self.totalSize = totalSize
        self.offset = offset
        self.data = data
    }
}

/// Sent by the destination once every page is in. `digest` is nil when the
/// destination cannot read guest memory (a page-fault handler serving a VMM's
/// uffd only installs pages; the VMM checks integrity itself).
public struct Complete: Sendable, Equatable {
    public var pagesReceived: UInt64
    public var digest: UInt64?
    public init(pagesReceived: UInt64, digest: UInt64?) {
        self.pagesReceived = pagesReceived
        self.digest = digest
    }
}

public struct CompleteAck: Sendable, Equatable {
    public var digestMatches: Bool
    public var pagesSentTwice: UInt64
    public init(digestMatches: Bool, pagesSentTwice: UInt64) {
        self.digestMatches = digestMatches
        self.pagesSentTwice = pagesSentTwice
    }
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

/// Handshake extension types.
public enum ExtensionType {
    /// The destination's 32-byte nonce for mutual authentication.
    public static let clientNonce: UInt16 = 1
}

/// The source proves it holds the shared key and challenges the destination:
/// `proof` = HMAC-SHA256(key, "postcopy source" ‖ clientNonce ‖ serverNonce).
public struct AuthChallenge: Sendable, Equatable {
    public var serverNonce: [UInt8]
    public var proof: [UInt8]
    public init(serverNonce: [UInt8], proof: [UInt8]) {
        self.serverNonce = serverNonce
        self.proof = proof
    }
}

/// The destination's proof: HMAC-SHA256(key, "postcopy destination" ‖ serverNonce ‖ clientNonce).
public struct AuthResponse: Sendable, Equatable {
    public var proof: [UInt8]
    public init(proof: [UInt8]) { self.proof = proof }
}

/// The destination asks for one-sided RDMA access to guest RAM. Answered only
/// on an authenticated main channel, and only once the guest paused.
public struct RDMARequest: Sendable, Equatable {
    public init() {}
}

/// Where and how a destination may RDMA READ guest RAM: connect with rdma_cm to
/// `port` at the source's address, presenting `token` as private data; then READ
/// `[remoteAddress, remoteAddress + length)` with `rkey`. The region is
/// registered with remote READ access only. Region `r`'s page `p` lives at
/// `remoteAddress + sourceOffset(r) + p * pageSize`.
public struct RDMAOffer: Sendable, Equatable {
    public static let tokenBytes = 16
    public var port: UInt16
    public var token: [UInt8]
    public var remoteAddress: UInt64
    public var length: UInt64
    public var rkey: UInt32
    public init(port: UInt16, token: [UInt8], remoteAddress: UInt64, length: UInt64, rkey: UInt32) {
        self.port = port
        self.token = token
        self.remoteAddress = remoteAddress
        self.length = length
        self.rkey = rkey
    }
}

/// Every message of the protocol. `pageData` borrows its payload from the frame.
public enum Message {
    case hello(Hello)
    case welcome(Welcome)
    case error(ErrorMessage)
    case pageRequest(PageRequest)
    case pageData(PageDataHeader, payload: UnsafeRawBufferPointer)
    case zeroMapRequest(ZeroMapRequest)
    case zeroMap(ZeroMap)
    case deviceStateRequest(DeviceStateRequest)
    case deviceState(DeviceState)
    case complete(Complete)
    case completeAck(CompleteAck)
    case pageDigestRequest(PageDigestRequest)
    case pageDigests(PageDigests)
    case authChallenge(AuthChallenge)
    case authResponse(AuthResponse)
    case rdmaRequest(RDMARequest)
    case rdmaOffer(RDMAOffer)

    public var type: MessageType {
        switch self {
        case .hello: .hello
        case .welcome: .welcome
        case .error: .error
        case .pageRequest: .pageRequest
        case .pageData: .pageData
        case .zeroMapRequest: .zeroMapRequest
        case .zeroMap: .zeroMap
        case .deviceStateRequest: .deviceStateRequest
        case .deviceState: .deviceState
        case .complete: .complete
        case .completeAck: .completeAck
        case .pageDigestRequest: .pageDigestRequest
        case .pageDigests: .pageDigests
        case .authChallenge: .authChallenge
        case .authResponse: .authResponse
        case .rdmaRequest: .rdmaRequest
        case .rdmaOffer: .rdmaOffer
        }
    }
}
