import PostcopyCore
import Synchronization

/// One migration session: the pages already sent (each page goes out once per
/// session; a second send is counted, never silent).
final class SourceSession: Sendable {
    let id: UInt64
    private let sent: Locked<(bits: [UInt64], distinct: Int)>

    init(id: UInt64, pages: Int) {
        self.id = id
        sent = Locked(([UInt64](repeating: 0, count: (pages + 63) / 64), 0))
    }

    /// Pages sent at least once.
    var distinctSent: Int { sent.withLock { $0.distinct } }

    /// Marks pages sent; returns how many had been sent before.
    func markSent(globalFirst: Int, count: Int) -> Int {
        sent.withLock { s in
            var dup = 0
            for p in globalFirst..<(globalFirst + count) {
                let m: UInt64 = 1 << UInt64(p & 63)
                if s.bits[p >> 6] & m != 0 { dup += 1 } else { s.bits[p >> 6] |= m }
            }
            s.distinct += count - dup
            return dup
        }
    }
}
