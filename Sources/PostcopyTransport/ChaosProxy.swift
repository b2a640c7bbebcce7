import CPostcopy
import PostcopyCore
#if canImport(Glibc)
import Glibc
#endif

/// A TCP proxy in front of a source that can cut every connection through it.
public final class ChaosProxy: @unchecked Sendable {
    public let listener: TCPListener
    public let target: Endpoint
    private let lock = NSLockLite()
    private var pairs: [(TCPConnection, TCPConnection)] = []
    private var threads: [PThread] = []
    private var seen = false

    public init(target: Endpoint, listen: Endpoint = Endpoint(host: "127.0.0.1", port: 0)) throws(TransportError) {
        self.target = target
        listener = try TCPListener(listen)
        let accept = PThread(name: "proxy-accept") { [self] in
            while let down = try? listener.accept(maxBody: 1 << 16) {
                guard let up = try? TCPConnection.connect(target, maxBody: 1 << 16) else { down.shutdown(); continue }
                lock.withLock { pairs.append((down, up)); seen = true }
                let a = PThread(name: "proxy-up") { Self.pump(down, up) }
                let b = PThread(name: "proxy-down") { Self.pump(up, down) }
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

    /// Whether any connection has gone through the proxy yet.
    public var hasSeenConnections: Bool { lock.withLock { seen } }

    public func stop() {
        listener.shutdown()
        cut()
    }
}

