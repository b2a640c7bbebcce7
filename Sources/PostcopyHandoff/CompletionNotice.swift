import Foundation

/// "Tell me when every page is in": a VMM that must not run its vCPUs before
/// all of guest RAM arrived (pure precopy, `--postcopy off`: the rest is copied
/// while the guest stays paused) sends `request` on the handoff socket after
/// its handoff message, without fds; the daemon answers with one line of JSON,
/// `{"complete":true,"pages":N}` once every page is installed (at once if that
/// already happened), or `{"complete":false,"error":"..."}` if the session
/// failed. A plain Firecracker VMM never asks and never gets a byte.
public enum CompletionNotice {
    public static let request = Array(#"{"notify":{"complete":1}}"#.utf8)
    /// The longest answer a VMM reads (an error text is cut to fit).
    public static let maxAnswerBytes = 1024

    public struct Answer: Codable, Sendable, Equatable {
        public var complete: Bool
        public var pages: Int?
        public var error: String?

        public init(complete: Bool, pages: Int? = nil, error: String? = nil) {
            self.complete = complete
            self.pages = pages
            self.error = error
        }
    }

    /// Whether a later VMM message is this request (exactly; anything else is
    /// judged as an async-page-fault enable).
    public static func isRequest(_ bytes: [UInt8]) -> Bool {
        struct Body: Decodable { struct Inner: Decodable { var complete: Int }; var notify: Inner }
        guard let b = try? JSONDecoder().decode(Body.self, from: Data(bytes)) else { return false }
        return b.notify.complete == 1
    }

    /// The answer as the one line the daemon writes, at most `maxAnswerBytes`
    /// with its newline: a longer error is cut, judged by the encoded size (a
    /// character can take up to 6 bytes once escaped).
    public static func encode(_ answer: Answer) -> [UInt8] {
        func line(_ a: Answer) -> [UInt8] {
            Array((try? JSONEncoder().encode(a)) ?? Data(#"{"complete":false,"error":"unencodable"}"#.utf8)) + [UInt8(ascii: "\n")]
        }
        var a = answer
        var out = line(a)
        if out.count > maxAnswerBytes, let e = a.error {
            a.error = String(String.UnicodeScalarView(e.unicodeScalars.prefix(maxAnswerBytes / 8))) + "..."
            out = line(a)
        }
        return out
    }

    /// Parses the daemon's line (without its newline).
    public static func decode(_ line: [UInt8]) throws -> Answer {
        do { return try JSONDecoder().decode(Answer.self, from: Data(line)) } catch {
            throw HandoffError.malformedJSON("the daemon's completion notice is not JSON: \(String(decoding: line.prefix(200), as: UTF8.self))")
        }
    }
}
