import PostcopyCore
import PostcopyWire

/// What the source's page server needs from a transport that lets the
/// destination read guest RAM without the source's CPU (RDMA: RAM registered
/// for remote READ, an rdma_cm listener). The page server hands out offers on
/// authenticated main connections once the guest paused; the provider checks
/// the one-time tokens when the destination connects its page channels.
public protocol RemoteReadProvider: AnyObject, Sendable {
    /// A fresh one-time token for `session` and where to READ.
    func offer(session: UInt64) -> RDMAOffer
    /// Forgets the tokens of a finished session.
    func endSession(_ session: UInt64)
    /// Page channels (queue pairs) accepted so far.
    var acceptedConnectionCount: UInt64 { get }
    /// Tears every channel down and releases the registered memory.
    func stop()
}

/// One accepted connection of the page server: frames in, frames and
/// vectored page replies out (a TCP connection today).
public protocol FrameConnection: AnyObject, Sendable {
    /// The peer's address, for logs.
    var peer: String { get }
    /// Readable when a frame (or EOF) arrived.
    var pollDescriptor: Int32 { get }
    /// Page size of the session, once known: page-data frames are checked against it.
    var pageSize: Int? { get set }
    /// Read whatever is there, not one frame at a time (small requests in bursts).
    var readAhead: Bool { get set }
    var bytesSent: UInt64 { get }
    var bytesReceived: UInt64 { get }
    /// Blocks (up to `timeoutMs`, -1 forever) for the next frame.
    func receive(timeoutMs: Int32) throws(TransportError) -> Message
    /// The next frame if one is already there.
    func tryReceive() throws(TransportError) -> Message?
    /// `tryReceive` right after a frame came, in the same loop: may say nil
    /// without a system call when the last read showed nothing more was there.
    func tryReceiveMore() throws(TransportError) -> Message?
    func send(_ message: Message) throws(TransportError)
    /// Sends `parts` in order with as few system calls as possible.
    func sendv(_ parts: [UnsafeRawBufferPointer]) throws(TransportError)
    /// Every frame from now on travels encrypted under `keys` (both ways).
    func startEncryption(_ keys: StreamKeys) throws(TransportError)
    /// Frame bytes encrypted so far (0 in clear).
    var bytesEncrypted: UInt64 { get }
    /// Wakes a thread blocked on this connection (it sees EOF); `close` releases it.
    func shutdown()
    func close()
}

/// Where the page server accepts page channels (a TCP listener today).
public protocol PageChannelListener: AnyObject, Sendable {
    /// The port it listens on (useful when asked for port 0).
    var port: Int { get }
    /// The next connection, frames bounded to `maxBody` until the handshake
    /// says more; nil once `shutdown` was called.
    func acceptConnection(maxBody: Int) throws(TransportError) -> (any FrameConnection)?
    /// Stops accepting: a blocked `acceptConnection` returns nil.
    func shutdown()
}

extension TCPConnection: FrameConnection {
    public var pollDescriptor: Int32 { fd.raw }
}

extension TCPListener: PageChannelListener {
    public func acceptConnection(maxBody: Int) throws(TransportError) -> (any FrameConnection)? {
        try accept(maxBody: maxBody)
    }
}
