import CPostcopy
import Foundation
import PostcopyCore
import PostcopyTransport
import PostcopyWire
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// The encrypted record stream on real sockets: one side seals frames, the
/// test takes the ciphertext off the wire, mistreats it as an attacker on the
/// path would, and feeds it to the other side. Whatever is done to a record,
/// the receiver delivers exactly the frames before it and then fails; nothing
/// of the damaged frame reaches the caller (a page payload received into place
/// is never handed over).
@Suite("encrypted record stream", .serialized)
struct StreamRecordTests {
    static let key = Array("correct horse battery staple 42!".utf8)
    static let pageSize = 4096

    /// A connected, non-blocking Unix stream socket pair.
    static func socketPair() throws -> (Int32, Int32) {
        var fds: [Int32] = [0, 0]
        guard socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0, &fds) == 0 else { throw SystemError("socketpair", errno: errno) }
        for fd in fds { _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK) }
        var size: Int32 = 4 << 20
        for fd in fds { _ = setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &size, 4); _ = setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, 4) }
        return (fds[0], fds[1])
    }

    struct Keys {
        let source: StreamKeys
        let destination: StreamKeys
        init(key: [UInt8] = StreamRecordTests.key, receiverKey: [UInt8]? = nil) {
            let c = Authentication.nonce(), s = Authentication.nonce()
            source = StreamKeys(sharedKey: key, clientNonce: c, serverNonce: s, isSource: true)
            destination = StreamKeys(sharedKey: receiverKey ?? key, clientNonce: c, serverNonce: s, isSource: false)
        }
    }

    /// What the source side sends: a control frame, page replies (headers and
    /// payload in separate parts, as the page server sends them), a zero page,
    /// a gather reply, and frames after them. Each frame's description.
    static let pages: [[UInt8]] = (0..<6).map { i in
        var p = [UInt8](repeating: 0, count: pageSize)
        p.withUnsafeMutableBytes { cpc_fill_random($0.baseAddress, pageSize, UInt64(100 + i)) }
        return p
    }

    static func sendAll(_ c: TCPConnection) throws {
        try c.send(.completeAck(CompleteAck(digestMatches: true, pagesSentTwice: 0)))
        for i in 0..<4 {
            let h = PageDataHeader(requestID: UInt64(i + 1), region: 0, pageClass: .demand, isZero: false, pageOffset: UInt64(i), pageCount: 1)
            try sendv(c, [Codec.encodePageDataPrefix(h, payloadLength: pageSize), pages[i]])
        }
        try c.send(.pageData(PageDataHeader(requestID: 5, region: 0, pageClass: .background, isZero: true, pageOffset: 9, pageCount: 1),
                             payload: UnsafeRawBufferPointer(start: nil, count: 0)))
        let g = GatherData(firstRequestID: 6, pageClass: .prefetch, sourcePaused: true,
                           runs: [GatherRun(region: 0, pageOffset: 20, pageCount: 1), GatherRun(region: 0, pageOffset: 30, pageCount: 1, isZero: true),
                                  GatherRun(region: 0, pageOffset: 40, pageCount: 1)])
        try sendv(c, [Codec.encodeGatherDataPrefix(g, payloadLength: 2 * pageSize), pages[4], pages[5]])
        try c.send(.completeAck(CompleteAck(digestMatches: true, pagesSentTwice: 7)))
    }

    /// Sends the parts in one vectored send, as the page server does.
    static func sendv(_ c: TCPConnection, _ parts: [[UInt8]]) throws {
        let bufs = parts.map { p -> UnsafeMutableRawBufferPointer in
            let b = UnsafeMutableRawBufferPointer.allocate(byteCount: p.count, alignment: 16)
            b.copyBytes(from: p)
            return b
        }
        defer { bufs.forEach { $0.deallocate() } }
        try c.sendv(bufs.map { UnsafeRawBufferPointer($0) })
    }

    /// Frames sent by `sendAll`, as `describe` names them.
    static let expected = ["completeAck", "page 1 \(digest(pages[0]))", "page 2 \(digest(pages[1]))", "page 3 \(digest(pages[2]))",
                           "page 4 \(digest(pages[3]))", "zero 5", "gather 6 \(digest(pages[4] + pages[5]))", "completeAck"]
    /// Records of `sendAll`: one per frame, two per frame with pages.
    static let expectedRecords = 1 + 4 * 2 + 1 + 2 + 1

    static func digest(_ b: [UInt8]) -> UInt64 { b.withUnsafeBytes { cpc_xxh64($0.baseAddress, $0.count, 0) } }

    /// Seals `sendAll`'s frames and returns the bytes on the wire, split in records.
    static func wire(_ keys: Keys) throws -> [[UInt8]] {
        let (a, b) = try socketPair()
        let sender = TCPConnection(fd: a, peer: "sender", maxBody: 1 << 20)
        let raw = TCPConnection(fd: b, peer: "wire", maxBody: 1 << 20)
        try sender.startEncryption(keys.source)
        try sendAll(sender)
        sender.shutdown()
        var bytes: [UInt8] = []
        var buf = [UInt8](repeating: 0, count: 1 << 16)
        while true {
            _ = cpc_poll1(raw.fd.raw, Int16(POLLIN), 2000)
            let n = buf.withUnsafeMutableBytes { cpc_recv(raw.fd.raw, $0.baseAddress, $0.count) }
            if n == -Int(EAGAIN) { continue }
            if n <= 0 { break }
            bytes += buf[0..<n]
        }
        #expect(sender.bytesEncrypted > 0 && UInt64(bytes.count) == sender.bytesSent)
        var records: [[UInt8]] = []
        var at = 0
        while at + 4 <= bytes.count {
            let len = (0..<4).reduce(0) { $0 | Int(bytes[at + $1]) << (8 * $1) }
            records.append(Array(bytes[at..<min(bytes.count, at + 4 + len + 16)]))
            at += 4 + len + 16
        }
        #expect(at == bytes.count, "the wire is whole records")
        return records
    }

    /// Hands the receiving side `bytes`, then the end of the stream; returns
    /// the frames it delivered and how it stopped.
    static func receive(_ bytes: [UInt8], _ keys: StreamKeys, placement: PagePlacement? = nil) throws -> (frames: [String], error: TransportError?) {
        let (a, b) = try socketPair()
        let feeder = TCPConnection(fd: a, peer: "feeder", maxBody: 1 << 20)
        let receiver = TCPConnection(fd: b, peer: "receiver", maxBody: 1 << 20)
        receiver.pageSize = pageSize
        receiver.placement = placement
        try receiver.startEncryption(keys)
        try bytes.withUnsafeBytes { try feeder.send($0, UnsafeRawBufferPointer(start: nil, count: 0)) }
        feeder.shutdown()
        var frames: [String] = []
        while true {
            do {
                let m = try receiver.receive(timeoutMs: 5000)
                frames.append(describe(m, receiver))
            } catch {
                return (frames, error)
            }
        }
    }

    static func describe(_ m: Message, _ c: TCPConnection) -> String {
        switch m {
        case .pageData(let h, let payload):
            if h.isZero { return "zero \(h.requestID)" }
            return "page \(h.requestID) \(cpc_xxh64(payload.baseAddress, payload.count, 0))"
        case .gatherData(let g, let payload):
            var bytes: [UInt8] = []
            if let placed = c.gatherPlacement { for p in placed { bytes += p } } else { bytes = Array(payload) }
            return "gather \(g.firstRequestID) \(digest(bytes))"
        default:
            return "\(m.type)"
        }
    }

    /// Which frame record `r` belongs to (records of `sendAll`, in order).
    static let frameOfRecord = [0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 6, 6, 7]

    /// The cipher against a published test vector (sealed in pieces, opened
    /// in place, a flipped bit refused).
    @Test func cipherKnownAnswer() {
        #expect(StreamKeys.cipherSelfTest == 0, "caead_self_test failed at step \(StreamKeys.cipherSelfTest)")
    }

    @Test func frameRoundTripAndNothingInClear() throws {
        let keys = Keys()
        let records = try Self.wire(keys)
        #expect(records.count == Self.expectedRecords)
        let all = records.flatMap { $0 }
        for p in Self.pages {
            let inClear = Data(all).range(of: Data(p[1000..<1064])) != nil
            #expect(!inClear, "page bytes in clear on the wire")
        }
        let r = try Self.receive(all, keys.destination)
        #expect(r.frames == Self.expected)
        guard case .closed = r.error else { Issue.record("ended with \(String(describing: r.error))"); return }
    }

    /// Payloads received straight into place decrypt there, and are handed
    /// over only once their record verified.
    @Test func pagesDecryptIntoPlace() throws {
        let keys = Keys()
        let all = try Self.wire(keys).flatMap { $0 }
        let place = TestPlacement()
        let r = try Self.receive(all, keys.destination, placement: place)
        #expect(r.frames == Self.expected)
        #expect(place.given >= 5, "payloads went to their place (\(place.given))")
    }

    enum Attack: String, CaseIterable { case tamper, lengthField, replay, reorder, truncate, wrongKey, otherConnection }

    /// Records 5 and 6 are page 3's headers and payload (frame 3), record 11
    /// the gather reply's pages (frame 6): each attack on one delivers the
    /// frames before its frame and not one byte of that frame or later, with
    /// the payload received into its place or into the buffer.
    @Test(arguments: Attack.allCases, [(5, false), (6, false), (6, true), (11, true)])
    func attackedRecordDeliversNothingOfItsFrame(_ attack: Attack, record: (Int, Bool)) throws {
        let (r, placed) = record
        let keys = Keys()
        var records = try Self.wire(keys)
        let frame = Self.frameOfRecord[r]
        var receiverKeys = keys.destination
        var expected = Array(Self.expected[0..<frame])
        switch attack {
        case .tamper: records[r][4 + (records[r].count - 20) / 2] ^= 0x01
        case .lengthField: records[r][0] ^= 0x04
        case .replay:
            records.insert(records[r], at: r + 1)
            // A frame's last record replayed: the frame once, its replay refused.
            if Self.frameOfRecord[r + 1] != frame { expected = Array(Self.expected[0...frame]) }
        case .reorder: records.swapAt(r, r + 1)
        case .truncate: records = Array(records[0..<r]) + [Array(records[r].prefix(records[r].count / 2))]
        case .wrongKey:
            receiverKeys = Keys(receiverKey: Array("incorrect horse battery staple!!".utf8)).destination
            expected = []
        case .otherConnection:
            // Records of another connection under the same shared key: other nonces, other keys.
            let other = try Self.wire(Keys())
            records[r] = other[r]
        }
        let place = TestPlacement()
        let out = try Self.receive(records.flatMap { $0 }, receiverKeys, placement: placed ? place : nil)
        #expect(out.frames == expected, "\(attack): delivered \(out.frames)")
        switch (attack, out.error) {
        case (.truncate, .closed?): break
        case (_, .integrity?) where attack != .truncate: break
        default: Issue.record("\(attack): ended with \(String(describing: out.error))")
        }
    }

    /// One bit flipped anywhere in the stream (lengths, ciphertext, tags), 300
    /// times at random places, receiving into place or into the buffer: each
    /// time the receiver delivers a prefix of the frames, whole and equal, then
    /// fails; never a damaged frame, never a crash or a hang.
    @Test func anyFlippedBitEndsTheStreamCleanly() throws {
        let keys = Keys()
        let wire = try Self.wire(keys).flatMap { $0 }
        var rng = SystemRandomNumberGenerator()
        for trial in 0..<300 {
            var bytes = wire
            let at = Int.random(in: 0..<bytes.count, using: &rng)
            bytes[at] ^= UInt8(1) << UInt8.random(in: 0...7, using: &rng)
            let out = try Self.receive(bytes, keys.destination, placement: trial % 2 == 0 ? TestPlacement() : nil)
            #expect(out.frames.count < Self.expected.count && Array(Self.expected.prefix(out.frames.count)) == out.frames,
                    "bit \(at): delivered \(out.frames)")
            switch out.error {
            case .integrity?, .closed?: break
            default: Issue.record("bit \(at): ended with \(String(describing: out.error))")
            }
        }
    }

    /// A frame sent before encryption started and a frame after it: the
    /// receiver refuses to switch with clear bytes of the peer still buffered.
    @Test func switchingWithBufferedBytesIsRefused() throws {
        let (a, b) = try Self.socketPair()
        let sender = TCPConnection(fd: a, peer: "sender", maxBody: 1 << 16)
        let receiver = TCPConnection(fd: b, peer: "receiver", maxBody: 1 << 16)
        try sender.send([Message.completeAck(CompleteAck(digestMatches: true, pagesSentTwice: 0)), Message.completeAck(CompleteAck(digestMatches: true, pagesSentTwice: 1))])
        receiver.readAhead = true
        _ = try receiver.receive(timeoutMs: 2000)
        #expect(throws: TransportError.self) { try receiver.startEncryption(Keys().destination) }
    }
}

/// A placement that receives every non-zero payload into its own pages.
final class TestPlacement: PagePlacement, @unchecked Sendable {
    let memory = UnsafeMutableRawPointer.allocate(byteCount: 64 << 12, alignment: 4096)
    private(set) var given = 0
    deinit { memory.deallocate() }
    func placement(for header: PageDataHeader, payloadBytes: Int) -> UnsafeMutableRawPointer? {
        guard header.pageOffset < 64, Int(header.pageOffset) * 4096 + payloadBytes <= 64 << 12 else { return nil }
        given += 1
        return memory + Int(header.pageOffset) * 4096
    }
    var placementRegions: [UnsafeMutableRawBufferPointer] { [UnsafeMutableRawBufferPointer(start: memory, count: 64 << 12)] }
}
