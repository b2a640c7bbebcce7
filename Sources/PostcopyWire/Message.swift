/// The 8-byte frame header: magic u16, type u8, flags u8, body length u32.
public struct FrameHeader: Sendable, Equatable {
    public var type: MessageType
    public var flags: UInt8
    public var bodyLength: Int

    /// Parses and validates a header. Throws on bad magic, unknown type, or a
    /// body longer than `maxBody` (so a hostile length never drives an allocation).
    public static func parse(_ bytes: UnsafeRawBufferPointer, maxBody: Int = WireProtocol.defaultMaxBody) throws(WireError) -> FrameHeader {
        var r = ByteReader(UnsafeRawBufferPointer(rebasing: bytes.prefix(WireProtocol.headerSize)))
        let magic = try r.u16("frame magic")
        guard magic == WireProtocol.frameMagic else { throw .badMagic(magic) }
        let rawType = try r.u8("frame type")
        guard let type = MessageType(rawValue: rawType) else { throw .unknownType(rawType) }
        let flags = try r.u8("frame flags")
        let length = Int(try r.u32("frame length"))
        guard length <= maxBody else { throw .oversized(length: length, limit: maxBody) }
        return FrameHeader(type: type, flags: flags, bodyLength: length)
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
    case precopyPassRequest(PrecopyPassRequest)
    case dirtySet(DirtySet)
    case gatherRequest(GatherRequest)
    /// A gather reply: the payload is the non-zero runs' pages back to back.
    case gatherData(GatherData, payload: UnsafeRawBufferPointer)

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
        case .precopyPassRequest: .precopyPassRequest
        case .dirtySet: .dirtySet
        case .gatherRequest: .gatherRequest
        case .gatherData: .gatherData
        }
    }
}
