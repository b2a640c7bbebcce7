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
    public var version: UInt16 = WireProtocol.version
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
    public var version: UInt16 = WireProtocol.version
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
