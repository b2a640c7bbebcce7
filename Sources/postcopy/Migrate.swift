import ArgumentParser
import CPostcopy
import Foundation
import PostcopyCore
import PostcopyGuest
import PostcopyTransport
import Synchronization

/// A child `postcopy` process whose JSON Lines are collected as they come.
final class Child: @unchecked Sendable {
    let name: String
    let process = Process()
    private let stdinPipe = Pipe()
    private let lock = NSLockLite()
    private var events: [[String: Any]] = []
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
                    if let o = (try? JSONSerialization.jsonObject(with: line)) as? [String: Any] {
                        lock.withLock { events.append(o) }
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

    var all: [[String: Any]] { lock.withLock { events } }
    func first(_ event: String) -> [String: Any]? { all.first { $0["event"] as? String == event } }
    func waitFor(_ event: String, seconds: Double) -> [String: Any]? {
        let deadline = nowNanoseconds() + UInt64(seconds * 1e9)
        while nowNanoseconds() < deadline {
            if let e = first(event) { return e }
            if !process.isRunning, first(event) == nil { return nil }
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
}

struct MigrateCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "migrate",
        abstract: "Live-migrate a running reference guest by postcopy on this machine, and report how it went.",
        discussion: """
            Starts the guest at the source (it runs its workload and serves its RAM), starts the \
            destination daemon (Firecracker-style page-fault handler) and the destination guest ahead \
            of time, waiting like QEMU's -incoming; after --before seconds it pauses the source guest: \
            the device state goes over and the destination guest resumes at once on empty memory, \
            faulting pages in on demand while the rest streams in the background. Reports downtime \
            (pause at the source to first instruction at the destination), time to full copy, guest \
            operations per second before, during and after postcopy, the fault-latency histogram, and \
            integrity: every key-value checksum, and every page against the source's RAM at pause (a \
            page the guest writes at the destination is digested just before its first write).
            """)

    @OptionGroup var shape: GuestShape
    @Option(name: .long, help: "Seconds the guest runs at the source before the switchover.") var before: Double = 3
    @Option(name: .long, help: "Seconds the guest runs at the destination after the switchover.") var after: Double = 5
    @Option(name: .long, help: "Background streaming cap at the destination (bytes/s, e.g. 500M; 0 = none).") var backgroundRate: String = "0"
    @Option(name: .long, help: "Scheduling of the background streaming threads at the source and the destination: normal, low (nice 10) or idle (SCHED_IDLE: they run only on CPU that demand faults and the guest leave free).") var backgroundPriority: String = "normal"
    @Option(name: .long, help: "postcopy, or stop-and-copy (the baseline: copy all RAM while paused, then resume).") var mode: String = "postcopy"
    @Option(name: .long, help: "Transport: tcp, rdma (one-sided RDMA READ; --address must be an RDMA device's IP) or auto.") var transport: String = "tcp"
    @Option(name: .long, help: "IP address the source serves on and the destination connects to (for RDMA: the RDMA device's IP).") var address: String = "127.0.0.1"
    @Option(name: .long, help: "At the destination, run a task guest: this many cooperative tasks per vCPU reading random pages (0: the guest's own workload).") var tasks: Int = 0
    @Flag(name: .long, help: "With --tasks: paravirtual async page faults (a task that touches a missing page parks, the vCPU runs another).") var apf = false
    @Option(name: .long, help: "With --tasks: arithmetic iterations per read.") var think: UInt32 = 100
    @Option(name: .long, help: "With --tasks: the task guest's work is counted over the first this many ms after resuming.") var workWindowMs: Int = 1000
    @Flag(name: .long, help: "One JSON object on stdout instead of the summary.") var json = false

    func validate() throws {
        try shape.validateShape()
        guard ["postcopy", "stop-and-copy"].contains(mode) else { throw ValidationError("--mode must be postcopy or stop-and-copy") }
        guard ["tcp", "rdma", "auto"].contains(transport) else { throw ValidationError("--transport must be tcp, rdma or auto") }
        guard before > 0, after > 0 else { throw ValidationError("--before and --after must be positive") }
        guard !apf || (tasks > 0 && mode == "postcopy") else { throw ValidationError("--apf needs --tasks N and --mode postcopy") }
        guard parseByteSize(backgroundRate) != nil else { throw ValidationError("--background-rate must be a byte count such as 500M") }
        guard ThreadPriority(rawValue: backgroundPriority) != nil else { throw ValidationError("--background-priority must be normal, low or idle") }
    }

    func run() throws {
        let (size, workload, vcpus) = (shape.size, shape.workload, shape.vcpus)
        let socket = "/tmp/postcopy-migrate-\(getpid()).sock"
        defer { unlink(socket) }
        // A fresh shared key for this migration: guest RAM is secret, so source,
        // daemon and destination guest authenticate each other before any page moves.
        let keyFile = "/tmp/postcopy-migrate-\(getpid()).key"
        defer { unlink(keyFile) }
        let keyFD = open(keyFile, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        guard keyFD >= 0 else { throw fail("cannot create \(keyFile): \(SystemError("open", errno: errno))") }
        let keyText = Authentication.nonce().map { String($0, radix: 16) }.joined() + "\n"
        _ = keyText.withCString { write(keyFD, $0, strlen($0)) }
        close(keyFD)
        let say: (String) -> Void = { msg in if !json { FileHandle.standardError.write(Data((msg + "\n").utf8)) } }
        say("booting a \(size) guest (\(workload), \(vcpus) vCPUs) at the source...")
        let source = try Child("source guest", ["guest", "run", "--size", size, "--workload", workload, "--vcpus", "\(vcpus)",
                                                "--zipf-skew", "\(shape.zipfSkew)",
                                                "--listen", "\(address):0", "--json", "--report-ms", "100", "--key-file", keyFile,
                                                "--transport", transport == "tcp" ? "tcp" : transport,
                                                "--background-priority", backgroundPriority])
        var children = [source]
        func abort(_ why: String) -> ExitCode {
            for c in children { _ = c.finish(seconds: 0) }
            let detail = children.map { "\($0.name): \($0.errors.suffix(400))" }.joined(separator: "\n")
            return fail("\(why)\n\(detail)")
        }
        guard let listening = source.waitFor("listening", seconds: 120), let port = listening["port"] as? Int else {
            throw abort("the source guest did not start")
        }
        let bootedAt = nowNanoseconds()
        let postcopy = mode == "postcopy"
        var daemon: Child?
        if postcopy {
            say("source guest running, serving its RAM on \(address):\(port); starting the destination daemon and guest")
            let d = try Child("destination daemon", ["dest", "--handoff", socket, "--connect", "\(address):\(port)", "--once",
                                                     "--json", "--transport", transport, "--background-rate", backgroundRate, "--key-file", keyFile,
                                                     "--background-priority", backgroundPriority])
            children.append(d)
            guard d.waitFor("listening", seconds: 30) != nil else { throw abort("the destination daemon did not start") }
            daemon = d
        } else {
            say("source guest running, serving its RAM on \(address):\(port); starting the destination guest (stop-and-copy)")
        }
        let dest = try Child("destination guest", ["guest", "resume", "--source", "\(address):\(port)", "--run-for", "\(after)",
                                                   "--json", "--report-ms", "100", "--key-file", keyFile]
                                                   + (postcopy ? ["--handoff", socket] : ["--stop-and-copy"])
                                                   + (tasks > 0 ? ["--tasks", "\(tasks)", "--think", "\(think)", "--work-window-ms", "\(workWindowMs)"] : [])
                                                   + (apf ? ["--apf"] : []))
        children.append(dest)
        guard dest.waitFor("ready", seconds: 60) != nil else { throw abort("the destination guest did not get ready") }
        let wait = Double(bootedAt) / 1e9 + before - Double(nowNanoseconds()) / 1e9
        if wait > 0 { usleep(useconds_t(wait * 1e6)) }
        say("switching over: pausing the source guest")
        source.send("pause")
        guard let resumed = dest.waitFor("resumed", seconds: 60) else { throw abort("the destination guest did not resume") }
        let downtime = resumed["downtime_ns"] as? Int ?? -1
        say("destination guest resumed after \(formatDuration(ns: UInt64(max(downtime, 0)))) of downtime; running \(after) s")
        // A guest whose page-fault daemon died waits forever for its pages:
        // stop it 5 s after the daemon failed instead of waiting out the deadline.
        var daemonFailedAt: UInt64?
        let destStatus = dest.finish(seconds: after + 600) {
            guard let d = daemon, !d.process.isRunning, d.process.terminationStatus != 0 else { return false }
            if daemonFailedAt == nil {
                daemonFailedAt = nowNanoseconds()
                let how = d.process.terminationReason == .uncaughtSignal ? "killed by signal" : "exit status"
                say("the destination daemon failed (\(how) \(d.process.terminationStatus)); stopping the destination guest in 5 s")
            }
            return nowNanoseconds() - daemonFailedAt! > 5_000_000_000
        }
        let daemonStatus = daemon?.finish(seconds: 60) ?? 0
        let sourceStatus = source.finish(seconds: 60)

        let pausedAt = source.first("paused")?["paused_at_ns"] as? Int ?? 0
        let resumedAt = resumed["resumed_at_ns"] as? Int ?? 0
        // Stop-and-copy has every page in at the first instruction.
        let completedAt = postcopy ? daemon?.first("complete")?["completed_at_ns"] as? Int : resumed["resumed_at_ns"] as? Int
        let session = daemon?.first("session")
        let sourceDone = source.first("source_done")
        let verified = dest.first("verified")
        func rates(_ c: Child, _ range: Range<Int>) -> [Int] {
            c.all.filter { $0["event"] as? String == "ops" }.compactMap { e -> Int? in
                guard let t = e["t_ns"] as? Int, range.contains(t) else { return nil }
                return e["ops_per_s"] as? Int
            }
        }
        func mean(_ v: [Int]) -> Int? { v.isEmpty ? nil : v.reduce(0, +) / v.count }
        let beforeOps = rates(source, 0..<pausedAt)
        let duringOps = rates(dest, resumedAt..<(completedAt ?? Int.max))
        let afterOps = completedAt.map { rates(dest, $0..<Int.max) } ?? []
        let latency = session?["fault_latency"] as? [String: Any] ?? [:]
        let ok = destStatus == 0 && daemonStatus == 0 && sourceStatus == 0 && verified?["ok"] as? Bool == true
            && (!postcopy || session?["completed"] as? Bool == true)
        var reasons: [String] = []
        if !ok {
            for c in children where c.process.terminationStatus != 0 {
                let lastLine = c.errors.split(separator: "\n").last.map(String.init) ?? "exit status \(c.process.terminationStatus)"
                reasons.append("\(c.name): \(lastLine)")
            }
            if verified?["ok"] as? Bool != true { reasons.append("integrity check failed or did not run") }
        }
        let rel: (Int) -> Double = { Double($0 - pausedAt) / 1e9 }
        let opsSeries: (Child, String) -> [[Double]] = { c, side in
            c.all.filter { $0["event"] as? String == "ops" }.compactMap { e in
                guard let t = e["t_ns"] as? Int, let r = e["ops_per_s"] as? Int else { return nil }
                return [rel(t), Double(r)]
            }
        }
        let progress = (session?["progress"] as? [[Int]] ?? []).map { p in [rel(p[0]), Double(p[1]), Double(p[2]), Double(p[3])] }
        var result: [String: Any] = [
            "mode": mode, "memory_bytes": parseByteSize(size)!, "workload": workload, "vcpus": vcpus, "transport": transport,
            "transport_used": session?["transport"] as? String ?? (postcopy ? "unknown" : "tcp"),
            "zipf_skew": shape.zipfSkew,
            "background_rate": parseByteSize(backgroundRate)!, "before_seconds": before, "after_seconds": after,
            "downtime_ns": downtime, "ok": ok, "reasons": reasons,
            "downtime_breakdown_ns": ["device_state_received": resumed["device_state_received_ns"] ?? 0,
                                      "restore": resumed["restore_ns"] ?? 0,
                                      "source_stop": source.first("paused")?["stop_ns"] ?? 0],
            "ops_series_source": opsSeries(source, "source"), "ops_series_destination": opsSeries(dest, "destination"),
            "progress": progress, "fault_latency_cdf": session?["fault_latency_cdf"] ?? [],
            "stall_seconds": session?["stall_seconds"] ?? 0, "zero_pages": session?["zero_pages"] ?? 0,
            "bytes_received": session?["bytes_received"] ?? sourceDone?["bytes_sent"] ?? 0,
            "bytes_sent": session?["bytes_sent"] ?? 0,
            "source_cpu_seconds": sourceDone?["cpu_seconds"] ?? 0, "daemon_cpu_seconds": session?["cpu_seconds"] ?? 0,
            "prefetch_pages": 0,
            "ops_per_s_before": beforeOps, "ops_per_s_during": duringOps, "ops_per_s_after": afterOps,
            "fault_latency": latency, "integrity": verified ?? [:],
            "demand_pages": session?["demand_pages"] ?? 0, "background_pages": session?["background_pages"] ?? 0,
            "faults": session?["faults"] ?? 0,
            "exit_status": ["source": sourceStatus, "daemon": daemonStatus, "destination": destStatus],
        ]
        if let w = dest.first("task_work") { result["task_work"] = w }
        if let completedAt { result["time_to_full_copy_seconds"] = Double(completedAt - pausedAt) / 1e9 }
        if json {
            emitEvent(result)
        } else {
            let fmtOps: ([Int]) -> String = { v in mean(v).map { "\(fixed(Double($0) / 1e6, 2)) M" } ?? "n/a" }
            let perSecond: ([Int]) -> String = { v in v.map { "\(fixed(Double($0) / 1e6, 1))" }.joined(separator: " ") }
            let ns: (String) -> String = { k in formatDuration(ns: UInt64(latency[k] as? Int ?? 0)) }
            print("""
                \(mode) migration of a running \(formatBytes(Double(parseByteSize(size)!))) guest (\(workload), \(vcpus) vCPUs) over \(session?["transport"] as? String ?? "tcp"): \(ok ? "OK" : "FAILED")
                  downtime            \(formatDuration(ns: UInt64(max(downtime, 0)))) (source pause to first instruction at the destination)
                  time to full copy   \(completedAt.map { fixed(Double($0 - pausedAt) / 1e9, 3) + " s after the pause" } ?? "not reached")
                  guest ops/s         before \(fmtOps(beforeOps))   during postcopy \(fmtOps(duringOps))   after \(fmtOps(afterOps))  
                                      M ops/s every 100 ms: before [\(perSecond(Array(beforeOps.suffix(10))))] during [\(perSecond(duringOps))] after [\(perSecond(Array(afterOps.prefix(10))))]
                  pages               \(session?["demand_pages"] ?? 0) demanded, \(session?["background_pages"] ?? 0) streamed, \(session?["faults"] ?? 0) faults
                  fault service       p50 \(ns("p50_ns"))  p90 \(ns("p90_ns"))  p99 \(ns("p99_ns"))  p99.9 \(ns("p999_ns"))  max \(ns("max_ns"))
                  integrity           \(verified?["ok"] as? Bool == true ? "OK" : "FAILED"): \(verified?["kv_slots_verified"] ?? 0) key-value checksums hold (\(verified?["kv_slots_failed"] ?? "?") failed, \(verified?["get_checksum_failures"] ?? "?") failed GETs); \(verified?["pages_verified"] ?? 0) pages equal the source's RAM at pause, \(verified?["pages_mismatched"] ?? "?") differ (\(verified?["pages_verified_before_first_write"] ?? 0) of them written at the destination were digested just before their first write)
                """)
        }
        if !ok {
            for c in children where !c.errors.isEmpty { FileHandle.standardError.write(Data("\(c.name): \(c.errors.suffix(2000))\n".utf8)) }
            throw ExitCode(3)
        }
    }
}
