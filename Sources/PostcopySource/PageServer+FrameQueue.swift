import PostcopyTransport
import PostcopyWire

extension PageServer {
    /// The main channel's frames in the order they are served: a page or
    /// gather request of class prefetch before the stream's requests that came
    /// before it (their replies are matched by id, not by order), every other
    /// frame in the order it came.
    public struct FrameQueue {
        private var frames: [Message] = []
        public init() {}
        /// Frames read ahead at most (requests are small; gathers are few in flight).
        static let limit = 32

        /// The next frame to serve: one read ahead, else the next to come.
        public mutating func next(_ conn: any FrameConnection) throws(TransportError) -> Message {
            if frames.isEmpty {
                frames.append(try conn.receive(timeoutMs: -1))
            } else if frames.count < Self.limit, let m = try conn.tryReceive() {
                // A look at the socket (one recv): what came while the last
                // frame was served (`tryReceiveMore` would trust the last read).
                frames.append(m)
            }
            while frames.count < Self.limit, let more = try conn.tryReceiveMore() { frames.append(more) }
            let i = frames.firstIndex(where: Self.isPrefetch) ?? 0
            return frames.remove(at: i)
        }

        /// The frame after the one served, in order (a burst answered in one send).
        public mutating func more(_ conn: any FrameConnection) throws(TransportError) -> Message? {
            frames.isEmpty ? try conn.tryReceiveMore() : frames.removeFirst()
        }

        /// Puts back a frame taken by `more` and not served.
        public mutating func pushFront(_ m: Message) { frames.insert(m, at: 0) }

        public static func isPrefetch(_ m: Message) -> Bool {
            switch m {
            case .pageRequest(let r): r.pageClass == .prefetch
            case .gatherRequest(let g): g.pageClass == .prefetch
            default: false
            }
        }
    }
}
