import CPostcopy
import PostcopyCore
import PostcopyTransport
import PostcopyWire
#if canImport(Glibc)
import Glibc
#endif

/// What the proxy does to one encrypted record (`RecordFormat`: 4-byte length,
/// ciphertext, 16-byte tag) from the source: the attacks the AEAD stream must
/// turn into a failed connection, never into accepted bytes.
public struct RecordFault: Sendable, Equatable {
    public enum Kind: String, Sendable, CaseIterable {
        /// Flip one bit in the middle of the record's ciphertext.
        case tamper
        /// Forward the record twice.
        case replay
        /// Forward the record after the next one.
        case reorder
        /// Forward half of the record, then cut the connection.
        case truncate
    }
    public var kind: Kind
    /// The first record of at least `minBytes` plaintext bytes (a page
    /// payload) after this many records on a connection is the one.
    public var afterRecords: Int
    public var minBytes: Int

    public init(_ kind: Kind, afterRecords: Int = 30, minBytes: Int = 4096) {
        self.kind = kind
        self.afterRecords = afterRecords
        self.minBytes = minBytes
    }
}

extension ChaosProxy {
    /// Like `pump`, but reads the source's stream as its first frame in clear
    /// (the authentication challenge) and records after it, and applies `fault`
    /// to one record, once for the whole proxy (later connections pass intact,
    /// so recovery can finish the migration).
    func pumpRecords(_ a: TCPConnection, _ b: TCPConnection, _ fault: RecordFault) {
        let chunk = 1 << 16
        let buf = UnsafeMutableRawPointer.allocate(byteCount: chunk, alignment: 16)
        var pending: [UInt8] = []
        var clearDone = false
        var records = 0
        var held: [UInt8]?
        defer {
            buf.deallocate()
            a.shutdown()
            b.shutdown()
        }
        func send(_ f: ArraySlice<UInt8>) -> Bool {
            f.withUnsafeBytes { (try? b.send($0, UnsafeRawBufferPointer(start: nil, count: 0))) != nil }
        }
        func u32(_ at: Int, _ from: [UInt8]) -> Int {
            (0..<4).reduce(0) { $0 | Int(from[at + $1]) << (8 * $1) }
        }
        while true {
            if cpc_poll1(a.fd.raw, Int16(POLLIN), 1000) < 0 { return }
            let n = cpc_recv(a.fd.raw, buf, chunk)
            if n == -Int(EAGAIN) { continue }
            if n <= 0 { return }
            pending.append(contentsOf: UnsafeRawBufferPointer(start: buf, count: n))
            var used = 0
            while true {
                let avail = pending.count - used
                let total: Int
                if !clearDone {
                    guard avail >= WireProtocol.headerSize else { break }
                    total = WireProtocol.headerSize + u32(used + 4, pending)
                } else {
                    guard avail >= 4 else { break }
                    total = 4 + u32(used, pending) + 16
                }
                guard avail >= total else { break }
                let unit = pending[used..<(used + total)]
                used += total
                guard clearDone else {
                    clearDone = true
                    if !send(unit) { return }
                    continue
                }
                records += 1
                let hit = records > fault.afterRecords && total - 20 >= fault.minBytes && recordFaultsLeft()
                if !hit {
                    if !send(unit) { return }
                    if let h = held { held = nil; if !send(h[...]) { return } }
                    continue
                }
                switch fault.kind {
                case .tamper:
                    var bad = Array(unit)
                    bad[4 + (total - 20) / 2] ^= 0x10
                    if !send(bad[...]) { return }
                case .replay:
                    if !send(unit) || !send(unit) { return }
                case .reorder:
                    held = Array(unit)
                case .truncate:
                    _ = send(unit.prefix(total / 2))
                    usleep(20_000)
                    return
                }
            }
            pending.removeFirst(used)
        }
    }
}
