import PostcopyWire

/// Where the payload of a page reply is received, decided when its headers
/// have arrived and before any byte of the payload has: the destination's
/// alias of shared guest memory, at the pages' final offset, so each page is
/// written once. The completion then hands the installer a payload that is
/// already in place. Called on the thread that drains the channel.
public protocol PagePlacement: AnyObject, Sendable {
    /// Where to receive `payloadBytes` (exactly `pageCount` pages) of the
    /// reply `header`, or nil to receive them into the channel's buffer (a
    /// reply that matches no request in flight, pages not in the state the
    /// request left them in, anything unusual: the ordinary checks then run).
    func placement(for header: PageDataHeader, payloadBytes: Int) -> UnsafeMutableRawPointer?
    /// Every byte a placement may return, for transports whose hardware writes
    /// there (RDMA registers it before the first READ).
    var placementRegions: [UnsafeMutableRawBufferPointer] { get }
}
