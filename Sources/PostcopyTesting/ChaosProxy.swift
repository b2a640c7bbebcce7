import CPostcopy
import PostcopyCore
import PostcopyTransport
import PostcopyWire
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// What the proxy does to page replies from the source (frames, not bytes):
/// fault injection for recovery tests.
public struct ResponseFault: Sendable, Equatable {
    public enum Kind: String, Sendable, CaseIterable {
        /// Never forward the reply.
        case drop
        /// Forward it twice.
        case duplicate
        /// Hold it `delayMs` before forwarding (and everything after it).
        case delay
        /// Forward it after the next reply (or after 20 ms without one).
        case reorder
        /// Forward nothing more on that connection for `delayMs` (the source hangs).
        case stall
        /// Forward the reply's headers and part of its payload, ending in the
        /// middle of a page, wait `delayMs`, then cut the connection.
        case truncate
        /// Forward the reply's headers and part of its payload, ending in the
        /// middle of a page, wait `delayMs`, then the rest (a reply that is
        /// landing for a while).
        case split
    }
    public var kind: Kind
    /// Every `every`-th page reply on a connection is affected (1: all).
    public var every: Int
    public var delayMs: Int
    /// At most this many replies affected per connection (stall: in all).
    public var limit: Int
    /// Only gather replies count (and are affected), not single page replies.
    public var gathersOnly: Bool

    public init(_ kind: Kind, every: Int = 50, delayMs: Int = 20, limit: Int = 3, gathersOnly: Bool = false) {
        self.gathersOnly = gathersOnly
        self.kind = kind
        self.every = max(every, 1)
        self.delayMs = delayMs
        self.limit = limit
    }
}

/// A TCP proxy in front of a source that can cut every connection through it,
/// and mistreat page replies (`ResponseFault`).
public final class ChaosProxy: @unchecked Sendable {
    public let listener: TCPListener
    public let target: Endpoint
    private let lock = NSLockLite()
    private var pairs: [(TCPConnection, TCPConnection)] = []
    private var threads: [PThread] = []
    private var seen = false
    private var accepted = 0

    public let fault: ResponseFault?
    public let recordFault: RecordFault?
    let affectedCount = Atomic<Int>(0)
    /// Page replies the proxy dropped, duplicated, delayed, reordered or stalled so far.
    public var affected: Int { affectedCount.load(ordering: .relaxed) }

    public init(target: Endpoint, listen: Endpoint = Endpoint(host: "127.0.0.1", port: 0), fault: ResponseFault? = nil,
                recordFault: RecordFault? = nil, dropOnAccept: Set<Int> = []) throws(TransportError) {
        self.target = target
        self.fault = fault
        self.recordFault = recordFault
        listener = try TCPListener(listen)
        let accept = PThread(name: "proxy-accept") { [self] in
            while let down = try? listener.accept(maxBody: 1 << 16) {
                // The n-th connection (from 1) in `dropOnAccept` is closed at
                // once: the peer's hello meets the end of the stream.
                let n = lock.withLock { accepted += 1; return accepted }
                if dropOnAccept.contains(n) { down.shutdown(); continue }
                guard let up = try? TCPConnection.connect(target, maxBody: 1 << 16) else { down.shutdown(); continue }
                lock.withLock { pairs.append((down, up)); seen = true }
                let a = PThread(name: "proxy-up") { Self.pump(down, up) }
                let b = PThread(name: "proxy-down") { [self] in
                    if let recordFault { pumpRecords(up, down, recordFault) } else if let fault { pumpFrames(up, down, fault) } else { Self.pump(up, down) }
                }
                lock.withLock { threads += [a, b] }
            }
        }
        lock.withLock { threads.append(accept) }
    }

    public var port: Int { listener.port }

    /// Copies bytes from `a` to `b` until either side ends, then ends both.
    static func pump(_ a: TCPConnection, _ b: TCPConnection) {
        let buf = UnsafeMutableRawPointer.allocate(byteCount: 1 << 16, alignment: 16)
        defer {
            buf.deallocate()
            a.shutdown()
            b.shutdown()
        }
        while true {
            if cpc_poll1(a.fd.raw, Int16(POLLIN), 1000) < 0 { return }
            let n = cpc_recv(a.fd.raw, buf, 1 << 16)
            if n == -Int(EAGAIN) { continue }
            if n <= 0 { return }
            do { try b.send(UnsafeRawBufferPointer(start: buf, count: n), UnsafeRawBufferPointer(start: nil, count: 0)) } catch { return }
        }
    }

    /// Like `pump`, frame by frame, applying `fault` to page replies.
    private func pumpFrames(_ a: TCPConnection, _ b: TCPConnection, _ fault: ResponseFault) {
        let chunk = 1 << 16
        let buf = UnsafeMutableRawPointer.allocate(byteCount: chunk, alignment: 16)
        var pending: [UInt8] = []
        var held: [UInt8]?
        var replies = 0, affectedHere = 0
        defer {
            buf.deallocate()
            a.shutdown()
            b.shutdown()
        }
        func send(_ f: [UInt8]) -> Bool {
            f.withUnsafeBytes { (try? b.send($0, UnsafeRawBufferPointer(start: nil, count: 0))) != nil }
        }
        while true {
            let ready = cpc_poll1(a.fd.raw, Int16(POLLIN), held == nil ? 1000 : 20)
            if ready < 0 { return }
            if ready == 0 {
                if let h = held { held = nil; if !send(h) { return } }
                continue
            }
            let n = cpc_recv(a.fd.raw, buf, chunk)
            if n == -Int(EAGAIN) { continue }
            if n <= 0 { return }
            pending.append(contentsOf: UnsafeRawBufferPointer(start: buf, count: n))
            var used = 0
            while pending.count - used >= WireProtocol.headerSize {
                let len = pending.withUnsafeBytes { Int(UInt32(littleEndian: $0.loadUnaligned(fromByteOffset: used + 4, as: UInt32.self))) }
                guard pending.count - used >= WireProtocol.headerSize + len else { break }
                let frame = Array(pending[used..<(used + WireProtocol.headerSize + len)])
                used += frame.count
                var hit = false
                let isGather = frame[2] == MessageType.gatherData.rawValue
                if isGather || (frame[2] == MessageType.pageData.rawValue && !fault.gathersOnly) {
                    replies += 1
                    // A stall is the source hanging once, not every connection after it.
                    let affectedSoFar = fault.kind == .stall || fault.kind == .truncate ? affectedCount.load(ordering: .relaxed) : affectedHere
                    hit = replies % fault.every == 0 && affectedSoFar < fault.limit
                }
                if !hit {
                    if !send(frame) { return }
                    if let h = held { held = nil; if !send(h) { return } }
                    continue
                }
                affectedHere += 1
                affectedCount.add(1, ordering: .relaxed)
                switch fault.kind {
                case .drop:
                    break
                case .duplicate:
                    if !send(frame) || !send(frame) { return }
                case .delay:
                    usleep(useconds_t(fault.delayMs * 1000))
                    if !send(frame) { return }
                case .reorder:
                    if let h = held { if !send(h) { return } }
                    held = frame
                case .stall:
                    usleep(useconds_t(fault.delayMs * 1000))
                    if !send(frame) { return }
                case .truncate, .split:
                    let headers = WireProtocol.headerSize + (isGather
                        ? frame.withUnsafeBytes { Codec.gatherDataHeadSize(UnsafeRawBufferPointer(rebasing: $0[WireProtocol.headerSize...])) ?? 0 }
                        : PageDataHeader.encodedSize)
                    let payload = frame.count - headers
                    let keep = payload > 0 ? headers + payload / 2 + 100 : frame.count / 2
                    if !send(Array(frame[0..<keep])) { return }
                    usleep(useconds_t(fault.delayMs * 1000))
                    if fault.kind == .truncate { return }  // cut: both sides shut down
                    if !send(Array(frame[keep...])) { return }
                }
            }
            pending.removeFirst(used)
        }
    }

    /// Cuts every connection that goes through the proxy now; returns how many.
    @discardableResult
    public func cut() -> Int {
        let now = lock.withLock { () -> [(TCPConnection, TCPConnection)] in
            let p = pairs
            pairs.removeAll()
            return p
        }
        for (a, b) in now {
            a.shutdown()
            b.shutdown()
        }
        return now.count
    }

    /// Takes the one record fault of the proxy: true the first time only.
    func recordFaultsLeft() -> Bool {
        affectedCount.compareExchange(expected: 0, desired: 1, ordering: .relaxed).exchanged
    }

    /// Connections accepted so far (dropped ones included).
    public var connectionCount: Int { lock.withLock { accepted } }

    /// Whether any connection has gone through the proxy yet.
    public var hasSeenConnections: Bool { lock.withLock { seen } }

    public func stop() {
        listener.shutdown()
        cut()
    }
}

