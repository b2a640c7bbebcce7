import ArgumentParser
import Foundation

/// Prints one JSON object on one line (JSON Lines: a script reads line by line).
func emitJSON<T: Encodable>(_ value: T) {
    let enc = JSONEncoder()
    enc.outputFormatting = [.sortedKeys]
    if let d = try? enc.encode(value), let s = String(data: d, encoding: .utf8) { print(s) }
}

/// One event line on stdout, flushed at once (scripts and `migrate` read it live).
func emitEvent(_ event: GuestEvent) {
    guard let d = try? GuestEvent.encoder.encode(event) else { return }
    FileHandle.standardOutput.write(d + Data("\n".utf8))
}

/// One JSON object per line on stdout, flushed at once (for `migrate`'s report).
func emitEvent(_ fields: [String: Any]) {
    guard let d = try? JSONSerialization.data(withJSONObject: fields, options: [.sortedKeys]) else { return }
    FileHandle.standardOutput.write(d + Data("\n".utf8))
}

/// A value as a JSON object (dictionary, array, number), to embed in a report built as a dictionary.
func jsonObject<T: Encodable>(_ value: T) -> Any? {
    guard let d = try? GuestEvent.encoder.encode(value) else { return nil }
    return try? JSONSerialization.jsonObject(with: d)
}

/// Says `error: message` on stderr; the caller throws the result (exit status 1).
func fail(_ message: String) -> ExitCode {
    FileHandle.standardError.write(("error: " + message + "\n").data(using: .utf8)!)
    return ExitCode(1)
}
