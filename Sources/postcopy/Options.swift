import ArgumentParser
import Foundation
import Logging
import PostcopyCore
import PostcopyDestination
import PostcopyGuest
import PostcopyTransport

// The library enums are the option types: argument-parser checks the spelling
// and lists the allowed values in --help.
extension TransportKind: ExpressibleByArgument {}
extension StreamEncryption: ExpressibleByArgument {}
extension ThreadPriority: ExpressibleByArgument {}
extension Logger.Level: @retroactive ExpressibleByArgument {}
extension TouchMode: ExpressibleByArgument {}
extension InstallMode: ExpressibleByArgument {}
extension PrefetchMode: ExpressibleByArgument {}
extension Workload: ExpressibleByArgument {}

/// `HOST:PORT` or `[IPv6]:PORT`.
extension Endpoint: ExpressibleByArgument {
    public init?(argument: String) { self.init(parsing: argument) }
    public var defaultValueDescription: String { description }
}

/// `--background on|off` of `dest`.
enum BackgroundStreaming: String, CaseIterable, ExpressibleByArgument {
    case on, off
}

/// `--postcopy on|off` of `guest run`, `guest resume` and `migrate`: whether
/// postcopy follows precopy (hybrid) or the destination copies the rest while
/// the guest stays paused (pure precopy).
enum Toggle: String, CaseIterable, ExpressibleByArgument {
    case on
    case off
}

/// `--memory shared|anonymous` of `guest resume` and `migrate`: what the
/// destination VMM backs guest RAM with, and so the daemon's install path.
enum GuestMemoryKind: String, CaseIterable, ExpressibleByArgument {
    /// A memfd, handed to the daemon with the userfaultfd: pages are written
    /// through the daemon's preallocated alias and mapped with UFFDIO_CONTINUE.
    case shared
    /// Anonymous memory (Firecracker's plain handoff): UFFDIO_COPY.
    case anonymous
}

/// A byte count as the CLI spells it (`64M`, `1G`, `0`), keeping that spelling
/// for help defaults and for the arguments `migrate` passes on to its children.
struct ByteCount: ExpressibleByArgument, CustomStringConvertible {
    let bytes: Int
    let text: String

    init?(argument: String) {
        guard let n = parseByteSize(argument) else { return nil }
        bytes = n
        text = argument
    }

    var description: String { text }
    var defaultValueDescription: String { text }
}

/// `--key-file`, shared by every command that talks to a source or serves one.
struct KeyOptions: ParsableArguments {
    @Option(name: .long, help: "Shared key file (mode 600, at least 16 bytes): both sides must prove it before any page or state is exchanged.")
    var keyFile: String?

    @Option(name: .long, help: ArgumentHelp(
        "on or off (default: on with --key-file): encrypt every frame after the authentication (AES-256-GCM, keys derived from the shared key and both sides' nonces).",
        discussion: "Both sides must agree: each refuses a peer in the other mode. off is for a link you trust. RDMA READ cannot encrypt pages: with encryption on, --transport auto uses TCP, and --transport rdma sends pages in clear (control encrypted)."))
    var encryption: StreamEncryption?

    /// The shared key, or nil without --key-file.
    func loadKey() throws -> [UInt8]? {
        guard let keyFile else { return nil }
        do { return try Authentication.loadKey(keyFile) } catch { throw fail("\(error)") }
    }

    /// `--encryption`, checked: `on` needs a key to derive its keys from.
    func streamEncryption() throws -> StreamEncryption {
        if encryption == .on, keyFile == nil { throw fail("--encryption on needs --key-file: the stream's keys are derived from the shared key") }
        return encryption ?? .on
    }

    /// The arguments that give a child process the same key and mode.
    func arguments(keyFile path: String) -> [String] {
        ["--key-file", path] + (encryption.map { ["--encryption", $0.rawValue] } ?? [])
    }
}

/// What `source` and `dest` both take: transport, output, logging, background scheduling, key.
struct CommonOptions: ParsableArguments {
    @Option(name: .long, help: "Transport: tcp, rdma or auto (auto picks RDMA when available, else TCP, and says why).")
    var transport: TransportKind = .auto

    @Flag(name: .long, help: "Print the result as one JSON object on stdout (logs stay on stderr).")
    var json = false

    @Option(name: .long, help: "Log level: trace, debug, info, notice, warning, error, critical.")
    var logLevel: Logger.Level = .warning

    @Option(name: .long, help: "Scheduling of background streaming threads: normal, low (nice 10) or idle (SCHED_IDLE).")
    var backgroundPriority: ThreadPriority = .normal

    @OptionGroup var key: KeyOptions

    func loadKey() throws -> [UInt8]? { try key.loadKey() }
    func streamEncryption() throws -> StreamEncryption { try key.streamEncryption() }

    func makeLogger(_ label: String) -> Logger {
        LoggingSystem.bootstrap { StreamLogHandler.standardError(label: $0) }
        var l = Logger(label: label)
        // POSTCOPY_LOG_LEVEL overrides --log-level (for children started by `migrate`).
        l.logLevel = ProcessInfo.processInfo.environment["POSTCOPY_LOG_LEVEL"].map { Logger.Level(rawValue: $0) ?? .warning } ?? logLevel
        return l
    }
}

/// Size, workload and vCPUs of the reference guest (shared by `guest run` and `migrate`).
struct GuestShape: ParsableArguments {
    @Option(name: .long, help: "Guest RAM size, e.g. 256M, 1G.") var size = ByteCount(argument: "1G")!
    @Option(name: .long, help: "Workload: kv, scan, random or zipf.") var workload: Workload = .kv
    @Option(name: .long, help: "vCPU threads of the guest.") var vcpus: Int = 2
    @Option(name: .long, help: "Skew of the zipf distributions (kv keys, zipf page touches), 0.01-0.999.") var zipfSkew: Double = 0.99
    @Option(name: .long, help: "Percent of operations that write: kv SETs (default 10), or a byte of the page touched (random, zipf; default 0).") var writePercent: Int?

    func validate() throws {
        guard size.bytes >= 1 << 20, size.bytes % GuestLimits.pageSize == 0 else {
            throw ValidationError("--size must be at least 1M and a multiple of 4 KiB")
        }
        guard (1...256).contains(vcpus) else { throw ValidationError("--vcpus must be 1...256") }
        guard zipfSkew > 0, zipfSkew < 1 else { throw ValidationError("--zipf-skew must be between 0 and 1 (exclusive)") }
        guard (0...100).contains(writePercent ?? 0) else { throw ValidationError("--write-percent must be 0...100") }
    }

    var effectiveWritePercent: Int { writePercent ?? workload.defaultWritePercent }
}

/// Limits of the reference guests that the CLI checks before starting one.
enum GuestLimits {
    /// The reference guest's page size (`ReferenceGuest.pageSize`): guest RAM is a whole number of them.
    static let pageSize = 4096
    /// Most cooperative tasks per vCPU thread of the task guest (`guest resume --tasks`).
    static let maxTasksPerVCPU = 4096
}

/// `--key-file` and `--json` of the guest commands (`--json`: one event line per `GuestEvent`).
struct GuestIOOptions: ParsableArguments {
    @OptionGroup var key: KeyOptions
    @Flag(name: .long, help: "JSON Lines on stdout.") var json = false
}
