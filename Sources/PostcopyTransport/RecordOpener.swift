import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// The receiving half of an encrypted connection (`RecordFormat`). Ciphertext
/// is read from the socket into a small staging buffer and decrypted from there
/// straight into the place the reader asks for (a page in guest memory, or the
/// frame buffer): the cipher's one pass is the only copy after the kernel's.
///
/// The last byte of every record is given out only once the record's tag
/// verified, so a frame (which ends with a record) is complete only when every
/// byte of it is authentic: a tampered, replayed, reordered or cut record is
/// never delivered, and the bytes it wrote before the check sit where a torn
/// reply's would (received nowhere, re-requested after the reconnect).
final class RecordOpener {
    private let aead: AEADContext
    private let staging: UnsafeMutableRawPointer
    private let capacity: Int
    private var start = 0
    private var end = 0
    /// Plaintext bytes of the current record still to come (0: between records).
    private var left = 0
    /// Plaintext bytes decrypted so far (read by other threads: metrics).
    private let opened = Atomic<UInt64>(0)
    var bytesOpened: UInt64 { opened.load(ordering: .relaxed) }

    static let bufferBytes = 256 << 10

    init(key: [UInt8]) throws(TransportError) {
        aead = try AEADContext(key: key, encrypt: false)
        capacity = Self.bufferBytes
        staging = UnsafeMutableRawPointer.allocate(byteCount: capacity, alignment: 4096)
    }

    deinit { staging.deallocate() }

    /// Between two records: everything given out so far verified.
    var atBoundary: Bool { left == 0 }

    /// Whether part of a record waits in the staging buffer or is under way.
    var isMidRecord: Bool { left > 0 || end > start }

    /// Like `recv`: up to `max` plaintext bytes into `to` (-EAGAIN when the
    /// socket has nothing, 0 at its end, -errno), reading ciphertext with
    /// `recv` (which counts the wire bytes). Throws when a record is longer than
    /// `maxRecord` or does not verify.
    func read(into to: UnsafeMutableRawPointer, max: Int, maxRecord: Int, recv: (UnsafeMutableRawPointer, Int) -> Int) throws(TransportError) -> Int {
        guard max > 0 else { return -Int(EINVAL) }
        if left == 0 {
            if let r = fill(RecordFormat.lengthBytes, recv), r <= 0 { return r }
            var n = 0
            for i in 0..<RecordFormat.lengthBytes { n |= Int(staging.load(fromByteOffset: start + i, as: UInt8.self)) << (8 * i) }
            guard n > 0, n <= maxRecord else {
                throw .integrity("a record of \(n) bytes (1...\(maxRecord) allowed): not this stream's")
            }
            try aead.begin(length: staging + start)
            start += RecordFormat.lengthBytes
            left = n
        }
        if left > 1 {
            if end == start, let r = fill(1, recv), r <= 0 { return r }
            let n = min(max, left - 1, end - start)
            try aead.update(to, staging + start, n)
            start += n
            left -= n
            opened.add(UInt64(n), ordering: .relaxed)
            return n
        }
        // The record's last byte, given out once its tag verified.
        if let r = fill(1 + RecordFormat.tagBytes, recv), r <= 0 { return r }
        var last: UInt8 = 0
        try aead.update(&last, staging + start, 1)
        guard aead.open(tag: staging + start + 1) else {
            throw .integrity("record \(aead.counter - 1) does not verify (tampered, replayed, reordered or not from the peer that holds the key)")
        }
        start += 1 + RecordFormat.tagBytes
        left = 0
        to.storeBytes(of: last, as: UInt8.self)
        opened.add(1, ordering: .relaxed)
        return 1
    }

    /// Makes `n` bytes available at `start` (a recv, or more): nil when they
    /// are, else what the recv returned (-EAGAIN, 0, -errno).
    private func fill(_ n: Int, _ recv: (UnsafeMutableRawPointer, Int) -> Int) -> Int? {
        if start == end { start = 0; end = 0 }
        while end - start < n {
            if capacity - start < n {
                memmove(staging, staging + start, end - start)
                end -= start
                start = 0
            }
            let r = recv(staging + end, capacity - end)
            if r <= 0 { return r }
            end += r
        }
        return nil
    }
}
