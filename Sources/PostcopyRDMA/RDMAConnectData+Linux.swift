import PostcopyTransport
import PostcopyWire

/// Private data a destination presents in its rdma_cm connect request: the
/// session's one-time token (from `RDMAOffer`) and the channel kind.
enum RDMAConnectData {
    static let length = RDMAOffer.tokenBytes + 1
    static func encode(token: [UInt8], kind: ChannelKind) -> [UInt8] { token + [kind == .demand ? 1 : 2] }
}
