import PostcopyCore
import PostcopyTransport

/// Notices requests in flight that get no reply for `timeout` seconds (a source
/// that hangs, a reply lost): the caller then treats the connection as broken.
/// 0 waits forever.
struct StallWatch {
    let timeout: Double
    private var progressAt = nowNanoseconds()

    init(timeout: Double) { self.timeout = timeout }

    /// A reply arrived, or the first request of a burst left.
    mutating func progressed() { progressAt = nowNanoseconds() }

    /// How long to wait for events while requests are out: often enough to notice a stall.
    var pollMs: Int32 { timeout > 0 ? 250 : -1 }

    func check(inFlight: Int, _ what: String) throws(TransportError) {
        guard timeout > 0, inFlight > 0, Double(nowNanoseconds() - progressAt) / 1e9 > timeout else { return }
        throw .timedOut("no reply from the source to \(inFlight) \(what) request(s) for \(timeout) s")
    }
}
