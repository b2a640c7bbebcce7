import ArgumentParser
import CPostcopy
import Foundation
import Logging
import PostcopyCore
import PostcopyDestination
import PostcopyHandoff
import PostcopySource
import PostcopyRDMA
import PostcopyTransport
import PostcopyWire
import Synchronization

@main
struct Postcopy: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "postcopy",
        abstract: "Postcopy live-migration page transport (userfaultfd destination, page-serving source).",
        discussion: """
            A source serves guest RAM from a memory file; a destination registers guest RAM with \
            userfaultfd, resumes at once, pulls every page the guest touches on demand and streams \
            the rest in the background. Integrity is checked on every run (digest of all RAM).

            Typical run on one machine:
              postcopy make-memory /dev/shm/guest.ram --size 1G
              postcopy source --memory /dev/shm/guest.ram --listen 127.0.0.1:7070 &
              postcopy dest --connect 127.0.0.1:7070 --touch random --threads 4
            """,
        subcommands: [MigrateCommand.self, SourceCommand.self, DestCommand.self, GuestCommand.self, MakeMemoryCommand.self, BaselineCommand.self, ChaosProxyCommand.self])

    static func main() {
        // Children spawned by Foundation's Process can inherit a blocked SIGTERM.
        cpc_unblock_signals()
        Self.main(nil)
    }
}

/// `--key-file`, shared by every command that talks to a source or serves one.
struct KeyOptions: ParsableArguments {
    @Option(name: .long, help: "Shared key file (mode 600, at least 16 bytes): both sides must prove it before any page or state is exchanged.")
    var keyFile: String?

    /// The shared key, or nil without --key-file.
    func loadKey() throws -> [UInt8]? {
        guard let keyFile else { return nil }
        do { return try Authentication.loadKey(keyFile) } catch { throw fail("\(error)") }
    }
}

struct CommonOptions: ParsableArguments {
    @Option(name: .long, help: "Transport: tcp, rdma or auto (auto picks RDMA when available, else TCP, and says why).")
    var transport: String = "auto"

    @Flag(name: .long, help: "Print the result as one JSON object on stdout (logs stay on stderr).")
    var json = false

    @Option(name: .long, help: "Log level: trace, debug, info, notice, warning, error, critical.")
    var logLevel: String = "warning"

    @Option(name: .long, help: "Scheduling of background streaming threads: normal, low (nice 10) or idle (SCHED_IDLE).")
    var backgroundPriority: String = "normal"

    @OptionGroup var key: KeyOptions

    func loadKey() throws -> [UInt8]? { try key.loadKey() }

    func validateCommon() throws {
        guard TransportKind(rawValue: transport) != nil else {
            throw ValidationError("--transport must be tcp, rdma or auto (got '\(transport)')")
        }
        guard ThreadPriority(rawValue: backgroundPriority) != nil else {
            throw ValidationError("--background-priority must be normal, low or idle")
        }
        guard Logger.Level(rawValue: logLevel) != nil else {
            throw ValidationError("--log-level must be one of trace, debug, info, notice, warning, error, critical")
        }
    }

    func makeLogger(_ label: String) -> Logger {
        LoggingSystem.bootstrap { StreamLogHandler.standardError(label: $0) }
        var l = Logger(label: label)
        // POSTCOPY_LOG_LEVEL overrides --log-level (for children started by `migrate`).
        l.logLevel = Logger.Level(rawValue: ProcessInfo.processInfo.environment["POSTCOPY_LOG_LEVEL"] ?? logLevel) ?? .warning
        return l
    }
}

/// Prints one JSON object on one line (JSON Lines: a script reads line by line).
func emitJSON<T: Encodable>(_ value: T) {
    let enc = JSONEncoder()
    enc.outputFormatting = [.sortedKeys]
    if let d = try? enc.encode(value), let s = String(data: d, encoding: .utf8) { print(s) }
}

func fail(_ message: String) -> ExitCode {
    FileHandle.standardError.write(("error: " + message + "\n").data(using: .utf8)!)
    return ExitCode(1)
}

// MARK: - source

struct SourceCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "source",
        abstract: "Serve guest RAM from a memory file to one destination.",
        discussion: """
            Maps the memory file read-only (never copied into the heap), computes its zero-page map \
            and digest, listens, and serves page requests: demand pages on the urgent connection, \
            background batches on the main one, each on its own thread. Exits after the destination confirms \
            completion, unless --serve-forever.
            """)

    @Option(name: .long, help: "Guest memory file: a /dev/shm object, a memfd path (/proc/PID/fd/N) or a regular file.")
    var memory: String

    @Option(name: .long, help: "Address to listen on, HOST:PORT (port 0 picks a free port, printed on stdout).")
    var listen: String = "127.0.0.1:7070"

    @Option(name: .long, help: "Device-state blob to hand to the destination (optional).")
    var deviceState: String?

    @Flag(name: .long, help: "Keep serving new sessions after one completes.")
    var serveForever = false

    @OptionGroup var common: CommonOptions

    func validate() throws {
        try common.validateCommon()
        guard Endpoint(parsing: listen) != nil else { throw ValidationError("--listen must be HOST:PORT (got '\(listen)')") }
    }

    func run() throws {
        let logger = common.makeLogger("postcopy.source")
        let kind = TransportKind(rawValue: common.transport)!
        let t0 = nowNanoseconds()
        let cpu0 = processCPUNanoseconds()
        let mem: SourceMemory
        let file: MemoryFile
        do {
            file = try MemoryFile.open(memory)
            var blob: [UInt8] = []
            if let deviceState {
                blob = Array(try Data(contentsOf: URL(fileURLWithPath: deviceState)))
            }
            mem = try SourceMemory(file: file, pageSize: Int(getpagesize()), deviceState: blob)
        } catch {
            throw fail("cannot serve \(memory): \(error)")
        }
        let key = try common.loadKey()
        let rdma = try startRDMA(kind, host: Endpoint(parsing: listen)!.host, memory: mem.mapping, file: file.fd.raw, logger: logger)
        let server: PageServer
        do {
            server = try PageServer(memory: mem, listen: Endpoint(parsing: listen)!, exitAfterCompletion: !serveForever,
                                  backgroundPriority: ThreadPriority(rawValue: common.backgroundPriority)!,
                                  authKey: key, rdma: rdma, logger: logger)
        } catch {
            throw fail("\(error)")
        }
        let scanSeconds = Double(nowNanoseconds() - t0) / 1e9
        let scan = mem.waitForScan()!  // the file source is frozen and scanned at start
        let rss = ResidentMemorySampler(excluding: [mem.mapping.range])
        server.start()
        // What serving costs, apart from start-up (mapping, scan, RDMA registration).
        let serveCPU0 = processCPUNanoseconds()
        // Scripts wait for this line before starting the destination (with --json,
        // it is the first JSON line; the report follows as the second).
        let banner: String
        if common.json {
            banner = "{\"event\":\"listening\",\"port\":\(server.port),\"memory_bytes\":\(mem.mapping.length),\"zero_pages\":\(scan.zeroPages),\"digest\":\"\(MemoryDigest.hex(scan.digest))\"}\n"
        } else {
            banner = "listening on port \(server.port) (\(formatBytes(Double(mem.mapping.length))), \(scan.zeroPages) zero pages, digest \(MemoryDigest.hex(scan.digest)))\n"
        }
        FileHandle.standardOutput.write(banner.data(using: .utf8)!)
        server.waitUntilDone()
        server.stop()
        let s = server.stats
        let report = SourceReport(
            memoryBytes: mem.mapping.length, pageSize: mem.table.pageSize, zeroPages: scan.zeroPages,
            digest: MemoryDigest.hex(scan.digest), scanSeconds: scanSeconds,
            demandPages: s.demandPages.load(ordering: .relaxed), prefetchPages: s.prefetchPages.load(ordering: .relaxed),
            backgroundPages: s.backgroundPages.load(ordering: .relaxed), pagesSentTwice: s.pagesSentTwice.load(ordering: .relaxed),
            bytesSent: s.bytesSent.load(ordering: .relaxed), bytesReceived: s.bytesReceived.load(ordering: .relaxed),
            rejectedConnections: s.rejectedConnections.load(ordering: .relaxed),
            completedSessions: s.completedSessions.load(ordering: .relaxed),
            destinationDigestMatched: s.lastDigestMatched.load(ordering: .relaxed),
            rssOutsideGuestMaxBytes: rss.finish(excluding: [mem.mapping.range]),
            cpuSeconds: Double(processCPUNanoseconds() - cpu0) / 1e9,
            servingCPUSeconds: Double(processCPUNanoseconds() - serveCPU0) / 1e9,
            rdmaConnections: server.rdma?.acceptedConnectionCount ?? 0)
        if common.json {
            emitJSON(report)
        } else {
            print("""
                source done: \(report.completedSessions) session(s), digest \(report.destinationDigestMatched ? "confirmed by destination" : "NOT confirmed")
                  pages served: demand \(report.demandPages), background \(report.backgroundPages), sent twice \(report.pagesSentTwice)
                  bytes sent \(formatBytes(Double(report.bytesSent))), resident outside guest RAM (max) \(formatBytes(Double(report.rssOutsideGuestMaxBytes))), CPU \(fixed(report.cpuSeconds, 3)) s (\(fixed(report.servingCPUSeconds, 3)) s serving)
                """)
        }
        if report.completedSessions > 0 && !report.destinationDigestMatched { throw ExitCode(3) }
    }
}

struct SourceReport: Codable {
    var memoryBytes: Int, pageSize: Int, zeroPages: Int, digest: String, scanSeconds: Double
    var demandPages: UInt64, prefetchPages: UInt64, backgroundPages: UInt64, pagesSentTwice: UInt64
    var bytesSent: UInt64, bytesReceived: UInt64, rejectedConnections: UInt64, completedSessions: UInt64
    var destinationDigestMatched: Bool, rssOutsideGuestMaxBytes: Int, cpuSeconds: Double
    /// CPU time after start-up (mapping, scan, RDMA registration): what serving pages cost.
    var servingCPUSeconds: Double
    var rdmaConnections: UInt64

    enum CodingKeys: String, CodingKey {
        case memoryBytes = "memory_bytes", pageSize = "page_size", zeroPages = "zero_pages", digest, scanSeconds = "scan_seconds"
        case demandPages = "demand_pages", prefetchPages = "prefetch_pages", backgroundPages = "background_pages"
        case pagesSentTwice = "pages_sent_twice", bytesSent = "bytes_sent", bytesReceived = "bytes_received"
        case rejectedConnections = "rejected_connections", completedSessions = "completed_sessions"
        case destinationDigestMatched = "destination_digest_matched", rssOutsideGuestMaxBytes = "rss_outside_guest_max_bytes"
        case cpuSeconds = "cpu_seconds", servingCPUSeconds = "serving_cpu_seconds", rdmaConnections = "rdma_connections"
    }
}

// MARK: - dest

struct DestCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "dest",
        abstract: "Receive a guest's RAM by postcopy: fault pages in on demand, stream the rest.",
        discussion: """
            Maps guest RAM, registers it with userfaultfd (MISSING mode) and, with --touch, runs \
            threads that read every page the way a guest would. Demand faults are fetched on their \
            own connection ahead of the background stream. At the end the RAM digest is compared with \
            the source's; a mismatch exits with status 3.
            """)

    @Option(name: .long, help: "Source address, HOST:PORT.")
    var connect: String

    @Option(name: .long, help: "Serve VMMs instead: listen on this Unix socket for Firecracker-style handoffs (regions JSON + userfaultfd).")
    var handoff: String?

    @Flag(name: .long, help: "With --handoff: exit once the first VMM's session has ended.")
    var once = false

    @Option(name: .long, help: "How the built-in guest touches pages: random, sequential, shared (every thread every page, same order) or none.")
    var touch: String = "random"

    @Option(name: .long, help: "Guest threads touching pages.")
    var threads: Int = 4

    @Option(name: .long, help: "Guest compute between two touches, in microseconds (a busy loop, like a running vCPU).")
    var thinkUs: Int = 0

    @Option(name: .long, help: "Background streaming: on, or off (demand faults only; for latency measurements).")
    var background: String = "on"

    @Option(name: .long, help: "Pages per background request.")
    var batchPages: Int = 128

    @Option(name: .long, help: "Background requests in flight at most (default: 4 over TCP, 16 over RDMA).")
    var window: Int?

    @Option(name: .long, help: "Cap on the background stream, e.g. 200M (bytes per second); 0 = no cap.")
    var backgroundRate: String = "0"

    @Option(name: .long, help: "Seconds to keep reconnecting after the connection to the source breaks (guest threads stay parked meanwhile); 0 = fail at once.")
    var recoveryDeadline: Double = 60

    @Option(name: .long, help: "Seconds without a reply, while requests are out, after which the connection counts as broken and is re-established (0: wait forever).")
    var stallTimeout: Double = 20

    @Option(name: .long, help: "Seed of the random touch order.")
    var seed: UInt64 = 1

    @Option(name: .long, help: "Write the device state received from the source to this file.")
    var deviceStateOut: String?

    @Option(name: .long, help: "After the migration, compare guest RAM byte for byte with this memory file (the source's, on the same machine); exit 3 on any difference.")
    var verifyAgainst: String?

    @Flag(name: .long, help: "No progress bar, even on a terminal.")
    var noProgress = false

    @OptionGroup var common: CommonOptions

    func validate() throws {
        try common.validateCommon()
        guard Endpoint(parsing: connect) != nil else { throw ValidationError("--connect must be HOST:PORT (got '\(connect)')") }
        guard TouchMode(rawValue: touch) != nil else { throw ValidationError("--touch must be random, sequential, shared or none") }
        guard ["on", "off"].contains(background) else { throw ValidationError("--background must be on or off") }
        guard (1...1024).contains(threads) else { throw ValidationError("--threads must be 1...1024") }
        guard (1...Int(PostcopyWire.Protocol.maxPagesPerRequest)).contains(batchPages) else {
            throw ValidationError("--batch-pages must be 1...\(PostcopyWire.Protocol.maxPagesPerRequest)")
        }
        guard recoveryDeadline >= 0 else { throw ValidationError("--recovery-deadline must be 0 or more seconds") }
        guard stallTimeout >= 0 else { throw ValidationError("--stall-timeout must be 0 or more seconds") }
        guard (0...1_000_000).contains(thinkUs) else { throw ValidationError("--think-us must be 0...1000000") }
        guard (1...64).contains(window ?? 4) else { throw ValidationError("--window must be 1...64") }
        guard parseByteSize(backgroundRate) != nil else { throw ValidationError("--background-rate must be a byte count per second such as 200M or 0") }
        if background == "off" && touch == "none" {
            throw ValidationError("--background off with --touch none would never finish: nothing would fetch the pages")
        }
    }

    func run() throws {
        let logger = common.makeLogger("postcopy.dest")
        if let handoff { return try runHandoff(handoff, logger: logger) }
        if let reason = Userfaultfd.unavailableReason() { throw fail(reason) }
        var options = DestinationOptions()
        options.touch = TouchMode(rawValue: touch)!
        options.threads = threads
        options.thinkMicroseconds = thinkUs
        options.seed = seed
        options.deviceStateOut = deviceStateOut
        options.engine = engineConfig()
        let verification = Locked<(Int, Int?)?>(nil)
        if let verifyAgainst {
            let expected: MemoryMapping
            do {
                let f = try MemoryFile.open(verifyAgainst)
                expected = try MemoryMapping.file(fd: f.fd.raw, length: f.size, writable: false)
            } catch { throw fail("--verify-against: \(error)") }
            options.inspect = { regions in
                // One region, mapped like the file: compare it whole, then find the first difference.
                let got = regions.count == 1 ? regions[0] : UnsafeRawBufferPointer(start: nil, count: 0)
                var first: Int? = got.count == expected.length ? nil : 0
                if first == nil, memcmp(got.baseAddress!, expected.base, expected.length) != 0 {
                    first = zip(got, expected.bytes).enumerated().first { $0.element.0 != $0.element.1 }?.offset ?? 0
                }
                verification.withLock { $0 = (expected.length, first) }
            }
        }
        let key = try common.loadKey()
        let (transport, reason): (Transport, String)
        do {
            (transport, reason) = try TransportFactory.connect(TransportKind(rawValue: common.transport)!, endpoint: Endpoint(parsing: connect)!,
                                                      maxBatchPages: batchPages, authKey: key, logger: logger)
        } catch {
            throw fail("\(error)")
        }
        if !common.json { FileHandle.standardError.write("transport: \(transport.name) (\(reason))\n".data(using: .utf8)!) }
        let dest = StandaloneDestination(options: options, logger: logger)
        let progress = (!noProgress && !common.json && isatty(2) != 0) ? ProgressBar(dest) : nil
        var report: DestinationReport
        do {
            report = try dest.run(transport: transport, transportReason: reason)
        } catch {
            progress?.finish()
            throw fail("migration failed: \(error)")
        }
        progress?.finish()
        if let (n, first) = verification.withLock({ $0 }) {
            report.verifiedBytes = n
            report.firstDifferentByte = first
            if !common.json {
                print(first == nil ? "verified: all \(n) bytes equal \(verifyAgainst!)" : "VERIFY FAILED: first differing byte at offset \(first!)")
            }
        }
        if common.json {
            emitJSON(report)
        } else {
            printSummary(report)
        }
        if !report.digestMatch || !report.sourceConfirmedDigest || report.firstDifferentByte != nil { throw ExitCode(3) }
    }

    func engineConfig() -> EngineConfig {
        var c = EngineConfig()
        c.background = background == "on"
        c.batchPages = batchPages
        c.window = window
        c.backgroundRate = parseByteSize(backgroundRate)!
        c.backgroundPriority = ThreadPriority(rawValue: common.backgroundPriority)!
        c.recoveryDeadline = recoveryDeadline
        c.stallTimeout = stallTimeout
        return c
    }

    /// The page-fault daemon for VMMs (Firecracker's external handler protocol).
    func runHandoff(_ path: String, logger: Logger) throws {
        let kind = TransportKind(rawValue: common.transport)!
        let endpoint = Endpoint(parsing: connect)!
        let json = common.json
        // `--transport rdma` without a device fails now, not when a VMM arrives.
        do {
            let (_, reason) = try TransportFactory.connect(kind, endpoint: endpoint, maxBatchPages: batchPages, authKey: nil)
            logger.info("transport for VMMs: \(reason)")
        } catch { throw fail("\(error)") }
        let key = try common.loadKey()
        let server: HandoffServer
        do {
            server = try HandoffServer(
                path: path, source: endpoint, engineConfig: engineConfig(), authKey: key, logger: logger,
                transport: kind,
                onComplete: { pid, at in
                    if json {
                        emitEvent(["event": "complete", "vmm_pid": Int(pid), "completed_at_ns": at])
                    } else {
                        print("VMM pid \(pid): every page is in")
                    }
                },
                onSessionEnd: { report in
                    if json {
                        if let d = try? JSONEncoder().encode(report), var o = (try? JSONSerialization.jsonObject(with: d)) as? [String: Any] {
                            o["event"] = "session"
                            emitEvent(o)
                        }
                    } else {
                        let l = report.faultLatency
                        print("VMM pid \(report.vmmPid) gone: \(report.completed ? "complete" : "INCOMPLETE") \(report.error ?? ""); faults \(report.faults), demand \(report.demandPages), background \(report.backgroundPages); fault service p50 \(formatDuration(ns: l.p50Ns)) p99 \(formatDuration(ns: l.p99Ns)) max \(formatDuration(ns: l.maxNs))")
                    }
                })
        } catch {
            throw fail("\(error)")
        }
        server.start()
        if json { emitEvent(["event": "listening", "handoff": path]) } else { print("waiting for VMMs on \(path)") }
        server.wait(sessions: once ? 1 : 0)
        server.stop()
        if once, server.stats.completed.load(ordering: .relaxed) == 0 { throw ExitCode(1) }
    }

    func printSummary(_ r: DestinationReport) {
        let fl = r.faultLatency, gl = r.guestTouchLatency
        let rate = r.timeToFullCopySeconds > 0 ? Double(r.nonZeroPages * r.pageSize) / r.timeToFullCopySeconds : 0
        print("""
            postcopy migration of \(formatBytes(Double(r.guestBytes))) over \(r.transport): \(r.digestMatch ? "INTEGRITY OK" : "INTEGRITY MISMATCH") (digest \(r.destinationDigest), source \(r.sourceDigest))
              total time          \(fixed(r.totalSeconds, 3)) s (handshake \(fixed(r.handshakeSeconds, 3)) s, full copy \(fixed(r.timeToFullCopySeconds, 3)) s = \(formatBytes(rate))/s, verify \(fixed(r.digestSeconds, 3)) s)
              pages               \(r.totalPages) total: \(r.demandPages) demanded, \(r.backgroundPages) streamed, \(r.zeroPages) zero (never sent; \(r.zeroPagesFaulted) faulted)
              faults              \(r.faults) (\(r.faultsCoalesced) coalesced onto in-flight pages)
              bytes on the wire   \(formatBytes(Double(r.bytesReceived))) in, \(formatBytes(Double(r.bytesSent))) out (\(fixed(r.wireOverhead, 4)) × non-zero RAM)
              fault service       p50 \(formatDuration(ns: fl.p50Ns))  p99 \(formatDuration(ns: fl.p99Ns))  max \(formatDuration(ns: fl.maxNs))  (\(fl.count) faults)
              guest-seen faults   p50 \(formatDuration(ns: gl.p50Ns))  p99 \(formatDuration(ns: gl.p99Ns))  max \(formatDuration(ns: gl.maxNs))  (\(gl.count) touches that faulted)
              memory              \(formatBytes(Double(r.rssOutsideGuestMaxBytes))) resident outside guest RAM (max); CPU \(fixed(r.cpuSeconds, 3)) s
            """)
        if !r.recoveryNs.isEmpty {
            print("  reconnects          \(r.recoveryNs.count) after broken connections: \(r.recoveryNs.map { formatDuration(ns: $0) }.joined(separator: ", "))")
        }
    }
}

/// A one-line progress bar on stderr, redrawn every 200 ms.
final class ProgressBar: @unchecked Sendable {
    private let thread: PThread
    private let stopFlag = StopFlag()

    final class StopFlag: @unchecked Sendable {
        let lock = NSLockLite()
        var stopped = false
    }

    init(_ dest: StandaloneDestination) {
        let flag = stopFlag
        thread = PThread(name: "progress", priority: .idle) {
            let t0 = nowNanoseconds()
            while !flag.lock.withLock({ flag.stopped }) {
                usleep(200_000)
                guard let (c, total) = dest.live.withLock({ $0 }) else { continue }
                let done = c.settledPages.load(ordering: .relaxed)
                let frac = total == 0 ? 1 : Double(done) / Double(total)
                let width = 30
                let filled = Int(frac * Double(width))
                let bar = String(repeating: "#", count: filled) + String(repeating: ".", count: width - filled)
                let secs = Double(nowNanoseconds() - t0) / 1e9
                let line = "\r[\(bar)] \(fixed(frac * 100, 1))%  demand \(c.demandPages.load(ordering: .relaxed))  background \(c.backgroundPages.load(ordering: .relaxed))  \(fixed(secs, 1)) s "
                FileHandle.standardError.write(line.data(using: .utf8)!)
            }
            FileHandle.standardError.write("\r\u{1B}[K".data(using: .utf8)!)
        }
    }

    func finish() {
        stopFlag.lock.withLock { stopFlag.stopped = true }
        thread.join()
    }
}

// MARK: - make-memory

struct MakeMemoryCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "make-memory",
        abstract: "Create a guest memory file with a deterministic pattern (for demos and tests).")

    @Argument(help: "Path of the file to create (for example /dev/shm/guest.ram).")
    var path: String

    @Option(name: .long, help: "Size, e.g. 64M, 1G.")
    var size: String = "256M"

    @Option(name: .long, help: "Percentage of pages left all-zero.")
    var zeroPercent: Int = 25

    @Option(name: .long, help: "Pattern seed.")
    var seed: UInt64 = 42

    func validate() throws {
        guard let n = parseByteSize(size), n > 0, n % Int(getpagesize()) == 0 else {
            throw ValidationError("--size must be a positive multiple of the page size (e.g. 64M, 1G)")
        }
        guard (0...100).contains(zeroPercent) else { throw ValidationError("--zero-percent must be 0...100") }
    }

    func run() throws {
        do {
            try MemoryFile.create(path: path, size: parseByteSize(size)!, pageSize: Int(getpagesize()), zeroPercent: zeroPercent, seed: seed)
        } catch {
            throw fail("\(error)")
        }
        print("created \(path): \(size), \(zeroPercent)% zero pages")
    }
}

/// The source's RDMA listener for `--transport`: required for `rdma`, tried for
/// `auto` (saying why it is off when it cannot be had), none for `tcp`.
func startRDMA(_ kind: TransportKind, host: String, memory: MemoryMapping, file: Int32? = nil, logger: Logger) throws -> (any RemoteReadProvider)? {
    do { return try TransportFactory.serve(kind, host: host, memory: memory, file: file, logger: logger).provider } catch {
        throw fail("--transport rdma: \(error)")
    }
}
