import Foundation

/// "The work being recorded is done": a VMM restoring a snapshot whose
/// daemon records the working set (`--record-working-set`) sends `request`
/// on the handoff socket, without fds, once the guest finished the work the
/// record is for (its first invocation, as REAP records one): the record
/// window ends then, not at its fixed length (`--record-seconds`, which stays
/// the longest it lasts). A window in seconds holds fewer pages on a slower
/// machine; one ended by the work holds the pages that work needed. A daemon
/// that records nothing ignores it.
public enum RecordEnd {
    public static let request = Array(#"{"notify":{"record_end":1}}"#.utf8)

    /// Whether a later VMM message is this request (exactly).
    public static func isRequest(_ bytes: [UInt8]) -> Bool {
        struct Body: Decodable { struct Inner: Decodable { var record_end: Int }; var notify: Inner }
        guard let b = try? JSONDecoder().decode(Body.self, from: Data(bytes)) else { return false }
        return b.notify.record_end == 1
    }
}
