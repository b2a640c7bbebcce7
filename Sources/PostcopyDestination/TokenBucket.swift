import PostcopyCore

/// Paces background requests to `bytesPerSecond` (0: no limit), counted from
/// when the stream starts: a batch may leave once the bytes requested so far,
/// itself included, fit in the budget earned since.
struct TokenBucket {
    let bytesPerSecond: Int
    private let started = nowNanoseconds()
    private var requested = 0

    init(bytesPerSecond: Int) { self.bytesPerSecond = bytesPerSecond }

    /// Milliseconds to wait (at most 1000) before `bytes` more may be
    /// requested, or nil when they may go now.
    func delayMs(before bytes: Int) -> Int32? {
        guard bytesPerSecond > 0 else { return nil }
        let allowed = Double(bytesPerSecond) * Double(nowNanoseconds() - started) / 1e9
        let next = Double(requested + bytes)
        guard next > allowed else { return nil }
        return Int32(min(1000, ((next - allowed) / Double(bytesPerSecond) * 1000).rounded(.up)))
    }

    mutating func spend(_ bytes: Int) { requested += bytes }
}
