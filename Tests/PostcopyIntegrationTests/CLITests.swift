import Foundation
import PostcopyCore
import PostcopyDestination
import Synchronization
import Testing

/// The `postcopy` executable next to this test binary (swift build puts both in one folder).
let postcopyBinary: String? = {
    if let p = ProcessInfo.processInfo.environment["POSTCOPY_BIN"] { return p }
    let exe = URL(fileURLWithPath: "/proc/self/exe").resolvingSymlinksInPath()
    var dir = exe.deletingLastPathComponent()
    for _ in 0..<4 {
        let candidate = dir.appendingPathComponent("postcopy").path
        if FileManager.default.isExecutableFile(atPath: candidate) { return candidate }
        dir = dir.deletingLastPathComponent()
    }
    print("SKIP CLI tests: no postcopy binary beside \(exe.path); run `swift build` first or set POSTCOPY_BIN")
    return nil
}()

struct RunResult {
    var status: Int32
    var stdout: String
    var stderr: String
}

/// Runs a binary to completion, reading its stderr concurrently (a full pipe never blocks it).
func runProcess(_ path: String, _ args: [String]) throws -> RunResult {
    let p = Process()
    p.executableURL = URL(fileURLWithPath: path)
    p.arguments = args
    let out = Pipe(), err = Pipe()
    p.standardOutput = out
    p.standardError = err
    try p.run()
    let e = Locked<Data>(Data())
    let h = err.fileHandleForReading
    let reader = PThread(name: "test-stderr") { e.withLock { $0 = h.readDataToEndOfFile() } }
    let o = out.fileHandleForReading.readDataToEndOfFile()
    p.waitUntilExit()
    reader.join()
    return RunResult(status: p.terminationStatus, stdout: String(decoding: o, as: UTF8.self), stderr: String(decoding: e.withLock { $0 }, as: UTF8.self))
}

/// Runs `postcopy` to completion.
func runCLI(_ args: [String]) throws -> RunResult { try runProcess(postcopyBinary!, args) }

@Suite("postcopy CLI", .serialized, .enabled(if: postcopyBinary != nil, "postcopy binary not built"))
struct CLITests {
    @Test(.timeLimit(.minutes(3)), .enabled(if: uffdSkipReason == nil, "userfaultfd unavailable"), arguments: InstallMode.allCases)
    func sourceAndDestProcessesMigrateAndReportJSON(install: InstallMode) throws {
        if skipped(install) { return }
        let mem = "/dev/shm/postcopy-cli-test-\(getpid()).ram"
        defer { unlink(mem) }
        let made = try runCLI(["make-memory", mem, "--size", "16M", "--zero-percent", "20"])
        #expect(made.status == 0, "\(made.stderr)")

        let source = Process()
        source.executableURL = URL(fileURLWithPath: postcopyBinary!)
        source.arguments = ["source", "--memory", mem, "--listen", "127.0.0.1:0", "--json", "--transport", "tcp"]
        let out = Pipe()
        source.standardOutput = out
        try source.run()
        // First JSON line: {"event":"listening","port":N,...}.
        var banner = Data()
        while !banner.contains(UInt8(ascii: "\n")) {
            let chunk = out.fileHandleForReading.availableData
            if chunk.isEmpty { break }
            banner.append(chunk)
        }
        let listening = try? JSONSerialization.jsonObject(with: banner) as? [String: Any]
        #expect(listening?["event"] as? String == "listening")
        let port = listening?["port"] as? Int
        #expect(port != nil, "banner: \(String(decoding: banner, as: UTF8.self))")
        guard let port else { source.terminate(); return }

        let dest = try runCLI(["dest", "--connect", "127.0.0.1:\(port)", "--touch", "random", "--threads", "4", "--json", "--transport", "tcp",
                               "--install", install.rawValue])
        #expect(dest.status == 0, "dest failed: \(dest.stderr)")
        let report = try JSONSerialization.jsonObject(with: Data(dest.stdout.utf8)) as? [String: Any]
        #expect(report?["install_path"] as? String == install.rawValue)
        let prealloc = report?["preallocation_seconds"] as? Double ?? -1
        #expect(install == .continue ? prealloc > 0 : prealloc == 0, "preallocation_seconds \(prealloc)")
        #expect(report?["digest_match"] as? Bool == true)
        #expect(report?["source_confirmed_digest"] as? Bool == true)
        #expect((report?["faults"] as? Int ?? 0) > 0)
        #expect((report?["wire_overhead"] as? Double ?? 9) < 1.02)
        let latency = report?["fault_latency"] as? [String: Any]
        #expect((latency?["p50_ns"] as? Int ?? 0) > 0)

        let rest = out.fileHandleForReading.readDataToEndOfFile()
        source.waitUntilExit()
        #expect(source.terminationStatus == 0)
        let srcReport = try JSONSerialization.jsonObject(with: rest) as? [String: Any]
        #expect(srcReport?["destination_digest_matched"] as? Bool == true)
        #expect(srcReport?["pages_sent_twice"] as? Int == 0)
    }

    @Test func rdmaIsReportedUnavailableClearly() throws {
        let r = try runCLI(["dest", "--connect", "127.0.0.1:1", "--transport", "rdma"])
        #expect(r.status != 0)
        #expect(r.stderr.contains("RDMA"), "stderr: \(r.stderr)")
    }

    @Test(.enabled(if: dirtyTrackingSkipReason == nil, "async userfaultfd write-protect unavailable"))
    func dirtyScanBaselineReportsWhatItFound() throws {
        let r = try runCLI(["baseline", "dirty-scan", "--bytes", "16M", "--written", "300", "--samples", "100", "--json"])
        #expect(r.status == 0, "\(r.stderr)")
        let doc = try JSONSerialization.jsonObject(with: Data(r.stdout.utf8)) as? [String: Any]
        #expect(doc?["pages_written"] as? Int == 300)
        #expect(doc?["bytes"] as? Int == 16 << 20)
        #expect((doc?["scan"] as? [String: Any])?["count"] as? Int == 100)
        let bad = try runCLI(["baseline", "dirty-scan", "--bytes", "16M", "--written", "5000"])
        #expect(bad.status != 0 && bad.stderr.contains("--written"), "\(bad.stderr)")
    }

    @Test func badArgumentsExplainThemselves() throws {
        var r = try runCLI(["dest", "--connect", "nonsense"])
        #expect(r.status == 64)
        #expect(r.stderr.contains("HOST:PORT"))
        r = try runCLI(["dest", "--connect", "127.0.0.1:1", "--touch", "sideways"])
        #expect(r.status == 64)
        r = try runCLI(["source", "--memory", "/nonexistent/guest.ram", "--listen", "127.0.0.1:0"])
        #expect(r.status != 0)
        #expect(r.stderr.contains("/nonexistent/guest.ram"))
    }

    @Test(.enabled(if: uffdSkipReason == nil, "userfaultfd unavailable"))
    func connectionRefusedIsAClearError() throws {
        let r = try runCLI(["dest", "--connect", "127.0.0.1:1", "--transport", "tcp"])
        #expect(r.status == 1)
        #expect(r.stderr.contains("connect to 127.0.0.1:1"), "stderr: \(r.stderr)")
    }
}

@Suite("postcopy migrate", .serialized, .enabled(if: postcopyBinary != nil, "postcopy binary not built"))
struct MigrateCLITests {
    /// The whole live migration of a running guest, as the README runs it, small.
    @Test(.timeLimit(.minutes(3)), .enabled(if: uffdSkipReason == nil, "userfaultfd unavailable"))
    func runningGuestMigratesWithIntegrity() throws {
        for workload in ["kv", "zipf"] {
            let r = try runCLI(["migrate", "--size", "32M", "--before", "1", "--after", "1", "--workload", workload, "--json"])
            #expect(r.status == 0, "migrate failed: \(r.stderr)")
            let o = try JSONSerialization.jsonObject(with: Data(r.stdout.utf8)) as? [String: Any]
            #expect(o?["ok"] as? Bool == true)
            #expect((o?["downtime_ns"] as? Int ?? -1) > 0)
            #expect((o?["time_to_full_copy_seconds"] as? Double ?? -1) > 0)
            let integrity = o?["integrity"] as? [String: Any]
            #expect(integrity?["pages_mismatched"] as? Int == 0)
            #expect(integrity?["pages_verified"] as? Int == (32 << 20) / 4096)
            if workload == "kv" { #expect((integrity?["kv_slots_verified"] as? Int ?? 0) > 0) }
            let before = o?["ops_per_s_before"] as? [Int] ?? []
            let later = (o?["ops_per_s_during"] as? [Int] ?? []) + (o?["ops_per_s_after"] as? [Int] ?? [])
            #expect(before.count > 0 && later.count > 0, "ops/s reported before \(before), later \(later)")
        }
    }

    /// Hybrid, as an operator runs it: precopy passes while the guest writes
    /// (a zipf hot set), then postcopy for what is still dirty; byte-exact
    /// against the source at the pause, and the report says what precopy did.
    @Test(.timeLimit(.minutes(3)), .enabled(if: uffdSkipReason == nil, "userfaultfd unavailable"))
    func hybridMigrationPrecopiesThenPostcopiesWithIntegrity() throws {
        let r = try runCLI(["migrate", "--size", "64M", "--before", "1", "--after", "1", "--workload", "zipf", "--write-percent", "2",
                            "--precopy", "3", "--json"])
        #expect(r.status == 0, "migrate failed: \(r.stderr)")
        let o = try JSONSerialization.jsonObject(with: Data(r.stdout.utf8)) as? [String: Any]
        #expect(o?["ok"] as? Bool == true)
        let integrity = o?["integrity"] as? [String: Any]
        #expect(integrity?["pages_mismatched"] as? Int == 0, "integrity: \(integrity ?? [:]); daemon: \(r.stderr.suffix(2000))")
        #expect(integrity?["pages_verified"] as? Int == (64 << 20) / 4096)
        let source = o?["source_precopy"] as? [String: Any]
        #expect((source?["passes"] as? [Int] ?? []).count == 3, "passes: \(source ?? [:])")
        let decision = source?["decision"] as? String ?? ""
        #expect(decision.contains("3 precopy passes"))
        #expect((o?["precopy_pages"] as? Int ?? 0) >= (64 << 20) / 4096, "pass 1 covers every page")
        #expect((o?["clean_pages_released"] as? Int ?? 0) + (o?["clean_pages_mapped"] as? Int ?? 0) > 0)
        let pauseReason = o?["pause_reason"] as? String ?? ""
        #expect(pauseReason.contains("passes"))
        #expect((o?["total_migration_seconds"] as? Double ?? 0) >= (o?["time_to_full_copy_seconds"] as? Double ?? 1))
    }

    /// The task guest with async page faults, through `migrate` over TCP: the
    /// VMM asks for the completion notice and enables APF right after it, two
    /// messages the stream socket may deliver as one read.
    @Test(.timeLimit(.minutes(3)), .enabled(if: uffdSkipReason == nil, "userfaultfd unavailable"))
    func asyncPageFaultsThroughMigrate() throws {
        let r = try runCLI(["migrate", "--size", "32M", "--tasks", "8", "--apf", "--before", "1", "--after", "1", "--json"])
        #expect(r.status == 0, "migrate failed: \(r.stderr)")
        let o = try JSONSerialization.jsonObject(with: Data(r.stdout.utf8)) as? [String: Any]
        #expect(o?["ok"] as? Bool == true)
        let work = o?["task_work"] as? [String: Any]
        let notPresent = work?["not_present"] as? Int ?? 0
        #expect(notPresent > 0, "the guest took no async fault")
        #expect(work?["ready"] as? Int == notPresent)
    }

    /// A snapshot restored through the VMM handoff: recorded once, then
    /// restored without and with the working set replayed; every restore
    /// byte-exact, the replay checked and used.
    @Test(.timeLimit(.minutes(3)), .enabled(if: uffdSkipReason == nil, "userfaultfd unavailable"))
    func restoresRecordThenReplayTheWorkingSet() throws {
        // Generous: the work must be done within --run-for even by a debug build on a slow machine.
        let r = try runCLI(["restore", "--size", "64M", "--before", "1", "--restores", "1", "--work-ops", "5000",
                            "--record-seconds", "0.5", "--run-for", "3", "--json"])
        #expect(r.status == 0, "restore failed: \(r.stderr)")
        let o = try JSONSerialization.jsonObject(with: Data(r.stdout.utf8)) as? [String: Any]
        #expect(o?["ok"] as? Bool == true)
        let runs = o?["runs"] as? [[String: Any]] ?? []
        #expect(runs.map { $0["working_set"] as? String ?? "" } == ["record", "off", "replay"])
        #expect((runs.first?["recorded_pages"] as? Int ?? 0) > 0)
        let replay = runs.last ?? [:]
        #expect((replay["replay_pages"] as? Int ?? 0) > 0, "the replay fetched nothing")
        #expect(replay["refused"] as? String == "", "refused: \(replay["refused"] ?? "")")
        #expect(runs.allSatisfy { ($0["time_to_work_ns"] as? Int ?? -1) > 0 })
    }

    /// Pure precopy (--postcopy off): the same passes, then the destination
    /// fetches what is still dirty while the guest stays paused, and resumes it
    /// only once the daemon says every page is in: no demand fault at all,
    /// every page is in before the first instruction, byte-exact.
    @Test(.timeLimit(.minutes(3)), .enabled(if: uffdSkipReason == nil, "userfaultfd unavailable"))
    func purePrecopyResumesOnlyWithEveryPageIn() throws {
        let r = try runCLI(["migrate", "--size", "64M", "--before", "1", "--after", "1", "--workload", "kv", "--write-percent", "20",
                            "--precopy", "2", "--postcopy", "off", "--json"])
        #expect(r.status == 0, "migrate failed: \(r.stderr)")
        let o = try JSONSerialization.jsonObject(with: Data(r.stdout.utf8)) as? [String: Any]
        #expect(o?["ok"] as? Bool == true)
        #expect(o?["migration"] as? String == "pure precopy")
        #expect(o?["postcopy_after_precopy"] as? Bool == false)
        let integrity = o?["integrity"] as? [String: Any]
        #expect(integrity?["pages_mismatched"] as? Int == 0)
        #expect((integrity?["kv_slots_verified"] as? Int ?? 0) > 0)
        #expect(o?["demand_pages"] as? Int == 0, "a paused guest faults nothing")
        #expect(o?["faults"] as? Int == 0)
        let finalSet = (o?["source_precopy"] as? [String: Any])?["final_dirty_pages"] as? Int ?? 0
        #expect(finalSet > 0, "a kv guest writing 20 % of its operations leaves pages dirty at the pause")
        #expect((o?["background_pages"] as? Int ?? 0) >= finalSet, "the final set was fetched while paused")
        let breakdown = o?["downtime_breakdown_ns"] as? [String: Any]
        let allIn = breakdown?["all_pages_in"] as? Int ?? 0
        let downtime = o?["downtime_ns"] as? Int ?? 0
        #expect(allIn > 0 && allIn <= downtime, "every page in (\(allIn) ns after the pause) before resuming (\(downtime) ns)")
        #expect((o?["time_to_full_copy_seconds"] as? Double ?? 1) * 1e9 <= Double(downtime))
    }
}

@Suite("postcopy-bench", .serialized, .enabled(if: postcopyBinary != nil, "postcopy binary not built"))
struct BenchCLITests {
    var bench: String { URL(fileURLWithPath: postcopyBinary!).deletingLastPathComponent().appendingPathComponent("postcopy-bench").path }

    func runBench(_ args: [String]) throws -> RunResult { try runProcess(bench, args) }

    @Test(.timeLimit(.minutes(3)), .enabled(if: uffdSkipReason == nil, "userfaultfd unavailable"))
    func jsonSchemaAndPlots() throws {
        let dir = "/tmp/postcopy-bench-test-\(getpid())"
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let r = try runBench(["--sizes", "16M", "--modes", "postcopy,stop-and-copy", "--before", "0.5", "--after", "0.5", "--json", "--plot", dir])
        #expect(r.status == 0, "bench failed: \(r.stderr)")
        let doc = try JSONSerialization.jsonObject(with: Data(r.stdout.utf8)) as? [String: Any]
        #expect(doc?["schema_version"] as? Int == 1)
        let machine = doc?["machine"] as? [String: Any]
        #expect((machine?["cores"] as? Int ?? 0) > 0 && !(machine?["kernel"] as? String ?? "").isEmpty)
        let baselines = doc?["baselines"] as? [String: Any]
        for b in ["tcp_rtt", "uffd_fault"] {
            #expect(((baselines?[b] as? [String: Any])?["p50_ns"] as? Int ?? 0) > 0, "baseline \(b)")
        }
        let runs = doc?["runs"] as? [[String: Any]] ?? []
        #expect(runs.count == 2)
        for run in runs {
            let cfg = run["config"] as? [String: Any]
            #expect(run["ok"] as? Bool == true)
            #expect(cfg?["memory_bytes"] as? Int == 16 << 20)
            #expect((run["downtime_ns"] as? Int ?? 0) > 0)
            #expect((run["time_to_full_copy_seconds"] as? Double ?? 0) > 0)
            #expect((run["bytes_per_guest_page"] as? Double ?? 0) > 0)
            if cfg?["mode"] as? String == "postcopy" {
                let l = run["fault_latency"] as? [String: Any] ?? [:]
                let p50 = l["p50_ns"] as? Int ?? 0, p99 = l["p99_ns"] as? Int ?? 0, mx = l["max_ns"] as? Int ?? 0
                #expect(p50 > 0 && p50 <= p99 && p99 <= mx, "percentiles \(l)")
                #expect((l["count"] as? Int ?? 0) <= (run["faults"] as? Int ?? 0), "one latency per served fault at most")
                #expect(run["fault_p50_over_tcp_rtt_plus_uffd_fault"] as? Double != nil)
                #expect(run["downtime_over_stop_and_copy"] as? Double != nil)
                #expect(!(run["progress"] as? [[Double]] ?? []).isEmpty)
            }
        }
        for f in ["fault-latency-cdf.svg", "pages-present.svg", "guest-throughput.svg"] {
            let svg = (try? String(contentsOfFile: "\(dir)/\(f)", encoding: .utf8)) ?? ""
            #expect(svg.hasPrefix("<svg") && svg.contains("seconds since the pause") || svg.contains("latency (µs"), "\(f)")
            #expect(svg.contains("16M"), "\(f) has a legend naming the run")
        }
    }

    @Test(.timeLimit(.minutes(2)))
    func aFailedMigrationFailsTheBenchWithTheReason() throws {
        let r = try runBench(["--sizes", "8M", "--modes", "postcopy", "--transports", "rdma", "--before", "0.5", "--after", "0.5"])
        #expect(r.status != 0)
        #expect(r.stderr.contains("FAILED"), "stderr: \(r.stderr)")
        #expect(r.stderr.contains("RDMA"), "the reason is given: \(r.stderr)")
    }
}

/// Starts a long-running `postcopy` child and returns it with its first stdout line.
func startChild(_ args: [String]) throws -> (Process, Pipe, String) {
    let p = Process()
    p.executableURL = URL(fileURLWithPath: postcopyBinary!)
    p.arguments = args
    let out = Pipe()
    p.standardOutput = out
    p.standardError = FileHandle.nullDevice
    try p.run()
    var first = Data()
    while !first.contains(UInt8(ascii: "\n")) {
        let chunk = out.fileHandleForReading.availableData
        if chunk.isEmpty { break }
        first.append(chunk)
    }
    return (p, out, String(decoding: first, as: UTF8.self))
}

@Suite("postcopy chaos-proxy", .serialized, .enabled(if: postcopyBinary != nil, "postcopy binary not built"))
struct ChaosProxyCLITests {
    /// The CLI's own recovery path end to end: source, proxy cutting connections, destination.
    /// Cuts are 200 ms apart, longer than a reconnect takes even under a
    /// sanitizer, so each one finds live connections to cut (the 16 MiB
    /// migration at 4 MB/s lasts about 4 s).
    @Test(.timeLimit(.minutes(2)), .enabled(if: uffdSkipReason == nil, "userfaultfd unavailable"))
    func destinationRecoversThroughTheChaosProxy() throws {
        let mem = "/dev/shm/postcopy-chaos-test-\(getpid()).ram"
        defer { unlink(mem) }
        #expect(try runCLI(["make-memory", mem, "--size", "16M"]).status == 0)
        let (source, _, banner) = try startChild(["source", "--memory", mem, "--listen", "127.0.0.1:0", "--json"])
        defer { source.terminate() }
        let sourcePort = (try? JSONSerialization.jsonObject(with: Data(banner.utf8)) as? [String: Any])?["port"] as? Int ?? 0
        let (proxy, _, proxyBanner) = try startChild(["chaos-proxy", "--to", "127.0.0.1:\(sourcePort)", "--cuts", "5", "--interval-ms", "200"])
        defer { proxy.terminate() }
        let proxyPort = Int(proxyBanner.split(separator: " ").last?.trimmingCharacters(in: .whitespacesAndNewlines) ?? "") ?? 0
        #expect(sourcePort > 0 && proxyPort > 0, "banners: \(banner) \(proxyBanner)")
        let r = try runCLI(["dest", "--connect", "127.0.0.1:\(proxyPort)", "--touch", "random", "--threads", "1",
                            "--think-us", "200", "--background-rate", "4M", "--json", "--transport", "tcp"])
        #expect(r.status == 0, "dest failed: \(r.stderr.suffix(500))")
        let o = try JSONSerialization.jsonObject(with: Data(r.stdout.utf8)) as? [String: Any]
        #expect(o?["digest_match"] as? Bool == true)
        #expect((o?["recovery_ns"] as? [Int] ?? []).count >= 3, "reconnects: \(o?["recovery_ns"] ?? "none")")
    }
}
