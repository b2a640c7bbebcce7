import CPostcopy
import Foundation
import PostcopyCore

/// A child `postcopy` process whose JSON Lines are collected as they come.
final class Child: @unchecked Sendable {
    let name: String
    let process = Process()
    private let stdinPipe = Pipe()
    private let lock = NSLockLite()
    private var events: [GuestEvent] = []
    private let stderrText = Locked<String>("")
    private var readers: [PThread] = []

    init(_ name: String, _ args: [String]) throws {
        self.name = name
        process.executableURL = URL(fileURLWithPath: "/proc/self/exe").resolvingSymlinksInPath()
        process.arguments = args
        let out = Pipe(), err = Pipe()
        process.standardOutput = out
        process.standardError = err
        process.standardInput = stdinPipe
        try process.run()
        let outHandle = out.fileHandleForReading, errHandle = err.fileHandleForReading
        readers.append(PThread(name: "child-out") { [self] in
            var buffer = Data()
            while true {
                let chunk = outHandle.availableData
                if chunk.isEmpty { break }
                buffer.append(chunk)
                while let nl = buffer.firstIndex(of: UInt8(ascii: "\n")) {
                    let line = buffer[buffer.startIndex..<nl]
                    buffer = Data(buffer[(nl + 1)...])
                    if let e = GuestEvent.decode(line: line) {
                        lock.withLock { events.append(e) }
                    }
                }
            }
        })
        readers.append(PThread(name: "child-err") { [self] in
            let d = errHandle.readDataToEndOfFile()
            stderrText.withLock { $0 += String(decoding: d, as: UTF8.self) }
            // POSTCOPY_MIGRATE_LOGS=DIR keeps every child's stderr (with POSTCOPY_LOG_LEVEL, for diagnosis).
            if let dir = ProcessInfo.processInfo.environment["POSTCOPY_MIGRATE_LOGS"] {
                try? d.write(to: URL(fileURLWithPath: dir).appendingPathComponent(name.replacingOccurrences(of: " ", with: "-") + ".log"))
            }
        })
    }

    func send(_ line: String) { stdinPipe.fileHandleForWriting.write(Data((line + "\n").utf8)) }

    var all: [GuestEvent] { lock.withLock { events } }
    /// The first event of one kind, e.g. `first(\.resumed)`.
    func first<E>(_ kind: (GuestEvent) -> E?) -> E? { all.lazy.compactMap(kind).first }
    func waitFor<E>(_ kind: (GuestEvent) -> E?, seconds: Double) -> E? {
        let deadline = nowNanoseconds() + UInt64(seconds * 1e9)
        while nowNanoseconds() < deadline {
            if let e = first(kind) { return e }
            if !process.isRunning, first(kind) == nil { return nil }
            usleep(2_000)
        }
        return nil
    }

    /// Waits for exit (killing after `seconds`); returns the status.
    func finish(seconds: Double, giveUpIf: () -> Bool = { false }) -> Int32 {
        let deadline = nowNanoseconds() + UInt64(seconds * 1e9)
        while process.isRunning && nowNanoseconds() < deadline && !giveUpIf() { usleep(10_000) }
        if process.isRunning {
            process.terminate()
            let grace = nowNanoseconds() + 3_000_000_000
            while process.isRunning && nowNanoseconds() < grace { usleep(10_000) }
            if process.isRunning { kill(process.processIdentifier, SIGKILL) }
            process.waitUntilExit()
        }
        for r in readers { r.join() }
        return process.terminationStatus
    }

    var errors: String { stderrText.withLock { $0 } }

    /// What a failure shows of a child's stderr: its end, or the whole of a
    /// sanitizer's report (both sides of a race, both stacks), which a short
    /// tail would cut.
    static func tail(of errors: String) -> String {
        if let r = errors.range(of: "WARNING: ThreadSanitizer") ?? errors.range(of: "ERROR: AddressSanitizer") {
            return String(errors[r.lowerBound...].prefix(16_000))
        }
        return String(errors.suffix(1_000))
    }
}
