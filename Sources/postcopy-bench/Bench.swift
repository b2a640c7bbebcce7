import ArgumentParser
import Foundation
import PostcopyCore
import Synchronization

/// Runs `postcopy` (the binary next to this one) to completion; stdout parsed as JSON.
func runPostcopy(_ args: [String]) throws -> (status: Int32, json: [String: Any]?, stderr: String) {
    let exe = URL(fileURLWithPath: "/proc/self/exe").resolvingSymlinksInPath().deletingLastPathComponent().appendingPathComponent("postcopy")
    let p = Process()
    p.executableURL = exe
    p.arguments = args
    let out = Pipe(), err = Pipe()
    p.standardOutput = out
    p.standardError = err
    try p.run()
    // Drain stderr concurrently so a chatty child never blocks on a full pipe.
    let errData = Locked<Data>(Data())
    let errHandle = err.fileHandleForReading
    let done = DispatchSemaphore(value: 0)
    DispatchQueue.global().async {
        let d = errHandle.readDataToEndOfFile()
        errData.withLock { $0 = d }
        done.signal()
    }
    let o = out.fileHandleForReading.readDataToEndOfFile()
    p.waitUntilExit()
    done.wait()
    let lastLine = o.split(separator: UInt8(ascii: "\n")).last.map { Data($0) } ?? Data()
    let json = (try? JSONSerialization.jsonObject(with: lastLine)) as? [String: Any]
    return (p.terminationStatus, json, String(decoding: errData.withLock { $0 }, as: UTF8.self))
}

@main
struct PostcopyBench: ParsableCommand {
    static let rawStreamRounds = 3
    static let configuration = CommandConfiguration(
        commandName: "postcopy-bench",
        abstract: "Run complete migrations of the reference guest and report them next to baselines measured in the same run.",
        discussion: """
            For every combination of --transports, --sizes, --workloads and --modes (repeated --repeat \
            times) it runs `postcopy migrate` and collects: fault service latency percentiles (one \
            histogram per daemon thread, merged), downtime, time to full copy, demand / prefetch / \
            background / zero pages, bytes on the wire and per guest page, source and destination \
            CPU time, guest ops/s before, during and after, and the total guest stall time. Baselines \
            in the same run: raw TCP 4 KiB round trip and local userfaultfd fault (for the fault \
            latency ratio), and stop-and-copy (for downtime and total time). Prints a table, or the \
            JSON document (schema in bench/README.md) with --json; --plot DIR writes SVG charts. Exits \
            non-zero, with the reason, when any migration fails.
            """)

    @Option(name: .long, help: "Guest sizes, comma-separated.") var sizes: String = "1G,4G"
    @Option(name: .long, help: "Workloads: kv, scan, random, zipf (comma-separated).") var workloads: String = "kv"
    @Option(name: .long, help: "vCPU threads of the guest.") var vcpus: Int = 2
    @Option(name: .long, help: "Skew of the zipf distributions (kv keys, zipf page touches), 0.01-0.999.") var zipfSkew: Double = 0.99
    @Option(name: .long, help: "Migration modes: postcopy, hybrid (precopy passes while the source guest runs, --precopy policy, then postcopy; shared memory only), precopy (the same passes, then the rest copied while the guest stays paused: --postcopy off), stop-and-copy, postcopy-blocking and postcopy-apf (comma-separated); the last two run the task guest at the destination (--tasks per vCPU, random reads) with blocking or asynchronous page faults.") var modes: String = "postcopy,stop-and-copy"
    @Option(name: .long, help: "The hybrid and precopy modes' precopy policy: auto or a number of passes.") var precopy: String = "auto"
    @Option(name: .long, help: "Percent of the guest's operations that write (kv default 10, random and zipf default 0).") var writePercent: Int?
    @Option(name: .long, help: "Install paths of the postcopy modes: continue (shared guest RAM, preallocated, UFFDIO_CONTINUE) and copy (anonymous guest RAM, UFFDIO_COPY), comma-separated; both run in one bench for a side-by-side.") var install: String = "continue"
    @Option(name: .long, help: "The destination's prefetch in the postcopy-like modes: off, adaptive, or both (off,adaptive) for a side-by-side of demand faults, stall, fault latency and full copy.") var prefetch: String = "adaptive"
    @Option(name: .long, help: "Write sizes of the raw loopback TCP stream baselines (4K, and the transport's batch: 512K).") var streamWriteSizes: String = "4K,512K"
    @Option(name: .long, help: "Tasks per vCPU thread of the task guest (postcopy-blocking, postcopy-apf).") var tasks: Int = 8
    @Option(name: .long, help: "The task guest's work is counted over this many ms after it resumed.") var workWindowMs: Int = 500
    @Option(name: .long, help: "Transports: tcp, rdma (comma-separated).") var transports: String = "tcp"
    @Option(name: .long, help: "Background streaming cap (bytes/s, e.g. 500M; 0 = none).") var backgroundRate: String = "0"
    @Option(name: .long, help: "Scheduling of the background streaming threads (source and destination): normal, low or idle.") var backgroundPriority: String = "normal"
    @Option(name: .long, help: "on or off: the migrations' stream encryption (migrate's default, on: AES-256-GCM; the raw TCP baselines are always in clear, so compare streams with off).") var encryption: String = "on"
    @Option(name: .long, help: "Runs of each combination.") var `repeat`: Int = 1
    @Option(name: .long, help: "Seconds the guest runs before the switchover.") var before: Double = 2
    @Option(name: .long, help: "Seconds the guest runs at the destination.") var after: Double = 3
    @Option(name: .long, help: "Write SVG charts into this directory.") var plot: String?
    @Option(name: .long, help: "Also write the JSON document to this file.") var output: String?
    @Flag(name: .long, help: "Print the JSON document instead of the table.") var json = false

    func list(_ s: String) -> [String] { s.split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) }.filter { !$0.isEmpty } }

    func validate() throws {
        for s in list(sizes) where parseByteSize(s) == nil { throw ValidationError("bad size '\(s)'") }
        for w in list(workloads) where !["kv", "scan", "random", "zipf"].contains(w) { throw ValidationError("bad workload '\(w)'") }
        for m in list(modes) where !["postcopy", "hybrid", "precopy", "stop-and-copy", "postcopy-blocking", "postcopy-apf"].contains(m) { throw ValidationError("bad mode '\(m)'") }
        guard precopy == "auto" || (Int(precopy).map { (1...64).contains($0) } ?? false) else { throw ValidationError("--precopy must be auto or 1...64 passes") }
        guard (0...100).contains(writePercent ?? 0) else { throw ValidationError("--write-percent must be 0...100") }
        guard tasks >= 1, workWindowMs >= 1 else { throw ValidationError("--tasks and --work-window-ms must be positive") }
        for p in list(prefetch) where !["off", "adaptive"].contains(p) { throw ValidationError("bad prefetch '\(p)' (off, adaptive)") }
        guard !list(prefetch).isEmpty else { throw ValidationError("--prefetch needs off, adaptive or both") }
        for i in list(install) where !["copy", "continue"].contains(i) { throw ValidationError("bad install path '\(i)' (copy, continue)") }
        guard !list(install).isEmpty else { throw ValidationError("--install needs copy, continue or both") }
        for w in list(streamWriteSizes) where parseByteSize(w) == nil { throw ValidationError("bad stream write size '\(w)'") }
        guard ["on", "off"].contains(encryption) else { throw ValidationError("--encryption must be on or off, not '\(encryption)'") }
        for t in list(transports) where !["tcp", "rdma"].contains(t) { throw ValidationError("bad transport '\(t)'") }
        guard `repeat` >= 1 else { throw ValidationError("--repeat must be at least 1") }
        guard parseByteSize(backgroundRate) != nil else { throw ValidationError("bad --background-rate") }
        guard ["normal", "low", "idle"].contains(backgroundPriority) else { throw ValidationError("bad --background-priority") }
        guard zipfSkew > 0, zipfSkew < 1 else { throw ValidationError("--zipf-skew must be between 0 and 1 (exclusive)") }
    }

    func say(_ s: String) { FileHandle.standardError.write(Data((s + "\n").utf8)) }

    func run() throws {
        var uts = utsname()
        uname(&uts)
        let kernel = withUnsafeBytes(of: uts.release) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
        let machine: [String: Any] = ["kernel": kernel, "cores": ProcessInfo.processInfo.activeProcessorCount,
                                      "memory_bytes": ProcessInfo.processInfo.physicalMemory]
        say("baselines: raw TCP 4 KiB round trip, local userfaultfd fault...")
        var baselines: [String: Any] = [:]
        for b in ["tcp-rtt", "uffd-fault"] {
            let r = try runPostcopy(["baseline", b, "--json"])
            guard r.status == 0, let lat = r.json?["latency"] as? [String: Any] else {
                throw fail("baseline \(b) failed: \(r.stderr)")
            }
            baselines[b.replacingOccurrences(of: "-", with: "_")] = lat
        }
        say("baselines: raw loopback TCP stream at \(streamWriteSizes) writes...")
        var streams: [[String: Any]] = []
        // Three rounds, alternated (one raw stream moves by up to 40 % within a
        // sitting here): the summaries take each stream's median.
        for _ in 0..<Self.rawStreamRounds {
            for w in list(streamWriteSizes) {
                let r = try runPostcopy(["baseline", "tcp-stream", "--write-size", w, "--bytes", "1G", "--json"])
                guard r.status == 0, let j = r.json else { throw fail("baseline tcp-stream \(w) failed: \(r.stderr)") }
                streams.append(j)
            }
            // And at the batch's write size from memory into memory (1 GiB at each
            // end, allocated first), as a migration moves guest RAM: the hot
            // buffers above stay in the cache, guest pages do not.
            if let w = list(streamWriteSizes).max(by: { parseByteSize($0)! < parseByteSize($1)! }) {
                let r = try runPostcopy(["baseline", "tcp-stream", "--write-size", w, "--bytes", "1G", "--span", "1G", "--json"])
                guard r.status == 0, let j = r.json else { throw fail("baseline tcp-stream \(w) --span 1G failed: \(r.stderr)") }
                streams.append(j)
            }
        }
        baselines["tcp_stream"] = streams
        let a = (baselines["tcp_rtt"] as? [String: Any])?["p50_ns"] as? Int ?? 0
        let b = (baselines["uffd_fault"] as? [String: Any])?["p50_ns"] as? Int ?? 0

        var runs: [[String: Any]] = []
        var failures: [String] = []
        for transport in list(transports) {
            for size in list(sizes) {
                for workload in list(workloads) {
                  // Repeats alternate the modes (A B A B ...): a machine that
                  // drifts during the run does not favour one of them.
                  for i in 1...`repeat` {
                    for mode in list(modes) {
                      // Stop-and-copy installs nothing through the daemon: once;
                      // hybrid precopies into shared memory only.
                      for inst in mode == "stop-and-copy" ? ["none"] : ["hybrid", "precopy"].contains(mode) ? ["continue"] : list(install) {
                       for pf in mode == "stop-and-copy" ? ["-"] : list(prefetch) {
                        do {
                            say("\(transport) \(size) \(workload) \(mode)\(inst == "none" ? "" : " (\(inst))")\(pf == "-" ? "" : " prefetch \(pf)") run \(i)/\(`repeat`)...")
                            let taskMode = mode.hasPrefix("postcopy-")
                            let precopies = mode == "hybrid" || mode == "precopy"
                            let args = ["migrate", "--size", size, "--workload", workload, "--vcpus", "\(vcpus)",
                                        "--mode", taskMode || precopies ? "postcopy" : mode, "--zipf-skew", "\(zipfSkew)",
                                        "--transport", transport, "--background-rate", backgroundRate, "--background-priority", backgroundPriority,
                                        "--before", "\(before)", "--after", "\(after)", "--encryption", encryption, "--json"]
                                + (taskMode ? ["--tasks", "\(tasks)", "--work-window-ms", "\(workWindowMs)"] : [])
                                + (mode == "postcopy-apf" ? ["--apf"] : [])
                                + (precopies ? ["--precopy", precopy, "--postcopy", mode == "hybrid" ? "on" : "off"] : [])
                                + (writePercent.map { ["--write-percent", "\($0)"] } ?? [])
                                + (inst == "none" ? [] : ["--memory", inst == "continue" ? "shared" : "anonymous"])
                                + (pf == "-" ? [] : ["--prefetch", pf])
                            let r = try runPostcopy(args)
                            var run = r.json ?? [:]
                            run["config"] = ["size": size, "memory_bytes": parseByteSize(size)!, "workload": workload, "vcpus": vcpus,
                                             "zipf_skew": zipfSkew, "write_percent": writePercent ?? -1, "precopy": precopies ? precopy : "off",
                                             "mode": mode, "install": inst, "transport": transport, "background_rate": parseByteSize(backgroundRate)!,
                                             "background_priority": backgroundPriority, "before_seconds": before, "after_seconds": after, "repeat_index": i,
                                             "prefetch": pf, "encryption": encryption]
                            if r.status != 0 || run["ok"] as? Bool != true {
                                let why = (run["reasons"] as? [String])?.joined(separator: "; ") ?? ""
                                let detail = why.isEmpty ? String(r.stderr.split(separator: "\n").prefix(3).joined(separator: " | ")) : why
                                failures.append("\(transport) \(size) \(workload) \(mode) \(inst) run \(i): exit \(r.status): \(detail)")
                                run["ok"] = false
                            }
                            runs.append(run)
                        }
                       }
                      }
                    }
                  }
                }
            }
        }
        // Ratios against the baselines of this run.
        for i in runs.indices {
            guard let cfg = runs[i]["config"] as? [String: Any] else { continue }
            let postcopyLike = ["postcopy", "hybrid", "precopy"].contains(cfg["mode"] as? String ?? "")
            if postcopyLike, let p50 = (runs[i]["fault_latency"] as? [String: Any])?["p50_ns"] as? Int, a + b > 0 {
                runs[i]["fault_p50_over_tcp_rtt_plus_uffd_fault"] = Double(p50) / Double(a + b)
            }
            let peer = runs.first {
                let c = $0["config"] as? [String: Any]
                return c?["mode"] as? String == "stop-and-copy" && c?["size"] as? String == cfg["size"] as? String
                    && c?["workload"] as? String == cfg["workload"] as? String && c?["transport"] as? String == cfg["transport"] as? String
                    && $0["ok"] as? Bool == true
            }
            if postcopyLike, let d = runs[i]["downtime_ns"] as? Int, let sd = peer?["downtime_ns"] as? Int, sd > 0 {
                runs[i]["downtime_over_stop_and_copy"] = Double(d) / Double(sd)
            }
            if let bytes = runs[i]["bytes_received"] as? Int, let mem = cfg["memory_bytes"] as? Int, mem > 0 {
                runs[i]["bytes_per_guest_page"] = Double(bytes) / Double(mem / 4096)
            }
        }
        let apf = apfSummary(runs)
        let installs = installSummary(runs, streams: streams)
        let hybrids = hybridSummary(runs)
        let prefetches = prefetchSummary(runs)
        let sizeSeries = sizeSummary(runs)
        let config: [String: Any] = ["tasks": tasks, "work_window_ms": workWindowMs, "sizes": list(sizes), "workloads": list(workloads), "vcpus": vcpus, "zipf_skew": zipfSkew, "modes": list(modes),
                                     "install": list(install), "transports": list(transports), "encryption": encryption, "background_rate": parseByteSize(backgroundRate)!, "background_priority": backgroundPriority,
                                     "repeat": `repeat`, "before_seconds": before, "after_seconds": after,
                                     "precopy": precopy, "write_percent": writePercent ?? -1, "prefetch": list(prefetch)]
        let doc: [String: Any] = ["schema_version": 1, "tool": "postcopy-bench", "started_at": ISO8601DateFormatter().string(from: Date()),
                                  "machine": machine, "config": config, "baselines": baselines, "runs": runs, "failures": failures,
                                  "apf_summary": apf, "install_summary": installs, "hybrid_summary": hybrids,
                                  "prefetch_summary": prefetches, "size_summary": sizeSeries]
        if let plot {
            try writePlots(runs, to: plot)
            try writeSizePlot(sizeSeries, to: plot)
        }
        let d = try JSONSerialization.data(withJSONObject: doc, options: [.sortedKeys, .prettyPrinted])
        if let output { try (d + Data("\n".utf8)).write(to: URL(fileURLWithPath: output)) }
        if json {
            FileHandle.standardOutput.write(d + Data("\n".utf8))
        } else {
            printTable(runs, a: a, b: b, machine: machine)
            for s in streams {
                let span = s["span"] as? Int ?? 0, w = s["write_size"] as? Int ?? 0
                print("raw loopback TCP stream, \(w)-byte writes\(span > w ? ", memory to memory (\(span >> 20) MiB at each end)" : ""): "
                      + "\(fixed((s["bytes_per_second"] as? Double ?? 0) / Double(1 << 30), 2)) GiB/s, receiver CPU \(fixed(s["receiver_cpu_seconds_per_gib"] as? Double ?? 0, 3)) s/GiB")
            }
            for s in installs { print(s["line"] as? String ?? "") }
            for s in hybrids { print(s["line"] as? String ?? "") }
            for s in prefetches { print(s["line"] as? String ?? "") }
            for s in sizeSeries { print(s["line"] as? String ?? "") }
            for s in apf {
                let f: (Any?) -> String = { v in (v as? Double).map { fixed($0, 2) } ?? "-" }
                print("APF \(s["transport"] ?? "") \(s["size"] ?? "") \(s["install"] ?? "") (\(tasks) tasks per vCPU, random reads): work in the first \(workWindowMs) ms after resuming, "
                      + "median of \(s["runs"] ?? 0) runs each: async \(s["apf_ops_in_window"] ?? "-") vs blocking \(s["blocking_ops_in_window"] ?? "-") reads "
                      + "= \(f(s["apf_over_blocking"]))x (the blocking guest's includes its work after its full copy when that ends inside the window); "
                      + "reads per second while postcopy ran (resume to full copy): async \(s["apf_ops_per_s_during_postcopy"] ?? "-") vs blocking \(s["blocking_ops_per_s_during_postcopy"] ?? "-") "
                      + "= \(f(s["apf_over_blocking_during_postcopy"]))x; per-task stall (async) p50 \(f(s["apf_task_stall_p50_ms"])) ms, max \(f(s["apf_task_stall_max_ms"])) ms")
            }
        }
        if !failures.isEmpty {
            say("FAILED: " + failures.joined(separator: "\n        "))
            throw ExitCode(1)
        }
    }

    func writePlots(_ runs: [[String: Any]], to dir: String) throws {
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        let okRuns = runs.filter { $0["ok"] as? Bool == true }
        func label(_ r: [String: Any]) -> String {
            let c = r["config"] as? [String: Any] ?? [:]
            let inst = c["install"] as? String ?? "none"
            return "\(c["transport"] ?? "") \(c["size"] ?? "") \(c["workload"] ?? "")" + (inst == "none" ? "" : " \(inst)")
        }
        let post = okRuns.filter { ($0["config"] as? [String: Any])?["mode"] as? String == "postcopy" }
        // 1. Fault-latency CDF per transport (and size).
        let cdf = LineChart(
            title: "Fault service latency (CDF)", xLabel: "latency (µs, log scale)", yLabel: "faults served within (%)",
            series: post.map { r in
                .init(name: label(r), points: (r["fault_latency_cdf"] as? [[Double]] ?? []).map { ($0[1] / 1000, $0[0]) })
            }, logX: true)
        try cdf.render().write(toFile: "\(dir)/fault-latency-cdf.svg", atomically: true, encoding: .utf8)
        // 2. Pages present over time, demand vs background.
        var pagesSeries: [LineChart.Series] = []
        for r in post {
            let p = (r["progress"] as? [[Double]] ?? []).filter { $0[0] >= -0.1 }  // from just before the pause
            pagesSeries.append(.init(name: "\(label(r)) background", points: p.map { ($0[0], $0[2]) }))
            pagesSeries.append(.init(name: "\(label(r)) demand", points: p.map { ($0[0], $0[1]) }, dashed: true))
        }
        try LineChart(title: "Pages present at the destination", xLabel: "seconds since the pause", yLabel: "pages",
                      series: pagesSeries, markers: [(0, "pause")]).render().write(toFile: "\(dir)/pages-present.svg", atomically: true, encoding: .utf8)
        // 3. Guest throughput across the switchover.
        var tput: [LineChart.Series] = []
        for r in okRuns {
            let c = r["config"] as? [String: Any] ?? [:]
            let src = r["ops_series_source"] as? [[Double]] ?? []
            let dst = r["ops_series_destination"] as? [[Double]] ?? []
            // The guest does nothing while paused: 0 from the pause to the
            // first instruction at the destination (stop-and-copy's whole copy).
            let downtime = Double(r["downtime_ns"] as? Int ?? 0) / 1e9
            let paused: [(Double, Double)] = [(0, src.last.map { $0[1] / 1e6 } ?? 0), (0, 0), (downtime, 0)]
            let pts = src.map { ($0[0], $0[1] / 1e6) }.filter { $0.0 < 0 } + paused
                + dst.map { ($0[0], $0[1] / 1e6) }.filter { $0.0 > downtime }.sorted { $0.0 < $1.0 }
            tput.append(.init(name: "\(label(r)) \(c["mode"] ?? "")", points: pts, dashed: c["mode"] as? String == "stop-and-copy"))
        }
        try LineChart(title: "Guest throughput across the switchover", xLabel: "seconds since the pause (0 while the guest is paused)", yLabel: "guest operations (millions per second)",
                      series: tput, markers: [(0, "pause")]).render().write(toFile: "\(dir)/guest-throughput.svg", atomically: true, encoding: .utf8)
        say("plots written to \(dir): fault-latency-cdf.svg, pages-present.svg, guest-throughput.svg")
    }
}

func fail(_ message: String) -> ExitCode {
    FileHandle.standardError.write(Data(("error: " + message + "\n").utf8))
    return ExitCode(1)
}
