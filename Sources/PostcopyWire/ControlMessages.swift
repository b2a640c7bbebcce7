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
