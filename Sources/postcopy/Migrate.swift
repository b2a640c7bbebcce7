import ArgumentParser
import CPostcopy
import Foundation
import PostcopyCore
import PostcopyDestination
import PostcopyGuest
import PostcopyHandoff
import PostcopySource
import PostcopyTransport
import Synchronization

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

            With --precopy N or auto (hybrid, QEMU's postcopy-after-precopy), RAM is first copied \
            while the source guest runs, in passes (the pages written since the previous pass, \
            tracked with userfaultfd write-protect), and the source pauses when its policy says; the \
            pages written after they were sent are fetched again after the pause, the others are \
            mapped at the destination without a transfer (over RDMA, the passes are READ). \
            Needs --memory shared. With --postcopy off (pure precopy), the destination fetches those \
            pages while the guest stays paused and resumes it once every page is in: the downtime \
            then grows with what was still dirty at the pause.
            """)

    @OptionGroup var shape: GuestShape
    @Option(name: .long, help: "Seconds the guest runs at the source before the switchover.") var before: Double = 3
    @Option(name: .long, help: "Seconds the guest runs at the destination after the switchover.") var after: Double = 5
    @Option(name: .long, help: "Background streaming cap at the destination (bytes/s, e.g. 500M; 0 = none).") var backgroundRate = ByteCount(argument: "0")!
    @Option(name: .long, help: "Scheduling of the background streaming threads at the source and the destination: normal, low (nice 10) or idle (SCHED_IDLE: they run only on CPU that demand faults and the guest leave free).") var backgroundPriority: ThreadPriority = .normal
    @Option(name: .long, help: "postcopy, or stop-and-copy (the baseline: copy all RAM while paused, then resume).") var mode: MigrationMode = .postcopy
    @Option(name: .long, help: "Precopy while the source guest runs, before the pause: off, N passes, or auto (see guest run --help).") var precopy: String = "off"
    @Option(name: .long, help: "With --precopy: on (hybrid) or off (pure precopy: after the pause the destination copies what is still dirty, and the guest resumes only once every page is in).") var postcopy: Toggle = .on
    @Option(name: .long, help: "Destination guest RAM: shared (a memfd; the daemon writes pages through its preallocated alias and maps them with UFFDIO_CONTINUE) or anonymous (Firecracker's plain handoff; UFFDIO_COPY).") var memory: GuestMemoryKind = .shared
    @Option(name: .long, help: "The destination daemon's prefetch: adaptive or off (see dest --help).") var prefetch: PrefetchMode = .adaptive
    @Option(name: .long, help: "Transport: tcp, rdma (one-sided RDMA READ; --address must be an RDMA device's IP) or auto.") var transport: TransportKind = .tcp
    @Option(name: .long, help: "on or off: encrypt the stream between source and destination (AES-256-GCM under this migration's fresh key; see source --help). With on, --transport rdma still READs pages in clear.") var encryption: StreamEncryption = .on
    @Option(name: .long, help: "IP address the source serves on and the destination connects to (for RDMA: the RDMA device's IP).") var address: String = "127.0.0.1"
    @Option(name: .long, help: "At the destination, run a task guest: this many cooperative tasks per vCPU reading random pages (0: the guest's own workload).") var tasks: Int = 0
    @Flag(name: .long, help: "With --tasks: paravirtual async page faults (a task that touches a missing page parks, the vCPU runs another).") var apf = false
    @Option(name: .long, help: "With --tasks: arithmetic iterations per read.") var think: UInt32 = 100
    @Option(name: .long, help: "With --tasks: the task guest's work is counted over the first this many ms after resuming.") var workWindowMs: Int = 1000
    @Option(name: .long, help: "Milliseconds between two ops/s reports of the guests (the first report at the destination is the 'first interval' figure).") var reportMs: Int32 = 100
    @Flag(name: .long, help: "One JSON object on stdout instead of the summary.") var json = false

    func validate() throws {
        guard before > 0, after > 0 else { throw ValidationError("--before and --after must be positive") }
        guard (1...10_000).contains(reportMs) else { throw ValidationError("--report-ms must be 1...10000") }
        guard !apf || (tasks > 0 && mode == .postcopy) else { throw ValidationError("--apf needs --tasks N and --mode postcopy") }
        guard let p = PrecopyPolicy.mode(parsing: precopy) else { throw ValidationError("--precopy must be off, auto or a number of passes 1...64") }
        guard postcopy == .on || p != .off else { throw ValidationError("--postcopy off needs --precopy N or auto") }
        if p != .off {
            guard mode == .postcopy, memory == .shared else {
                throw ValidationError("--precopy needs --mode postcopy and --memory shared (precopied pages wait unmapped in the shared memory file)")
            }
        }
    }

    func run() throws {
        let (size, workload, vcpus) = (shape.size.text, shape.workload.rawValue, shape.vcpus)
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
                                                "--zipf-skew", "\(shape.zipfSkew)", "--write-percent", "\(shape.effectiveWritePercent)",
                                                "--listen", "\(address):0", "--json", "--report-ms", "\(reportMs)", "--key-file", keyFile, "--encryption", encryption.rawValue,
                                                "--transport", transport.rawValue, "--precopy", precopy, "--postcopy", postcopy.rawValue,
                                                "--background-priority", backgroundPriority.rawValue])
        var children = [source]
        func abort(_ why: String) -> ExitCode {
            for c in children { _ = c.finish(seconds: 0) }
            let detail = children.map { "\($0.name): \(Child.tail(of: $0.errors))" }.joined(separator: "\n")
            return fail("\(why)\n\(detail)")
        }
        guard let listening = source.waitFor(\.listening, seconds: 120), let port = listening.port else {
            throw abort("the source guest did not start")
        }
        let bootedAt = nowNanoseconds()
        let postcopy = mode == .postcopy
        var daemon: Child?
        if postcopy {
            say("source guest running, serving its RAM on \(address):\(port); starting the destination daemon and guest")
            let d = try Child("destination daemon", ["dest", "--handoff", socket, "--connect", "\(address):\(port)", "--once",
                                                     "--json", "--transport", transport.rawValue, "--background-rate", backgroundRate.text,
                                                     "--key-file", keyFile, "--encryption", encryption.rawValue, "--background-priority", backgroundPriority.rawValue,
                                                     "--prefetch", prefetch.rawValue])
            children.append(d)
            guard d.waitFor(\.listening, seconds: 30) != nil else { throw abort("the destination daemon did not start") }
            daemon = d
        } else {
            say("source guest running, serving its RAM on \(address):\(port); starting the destination guest (stop-and-copy)")
        }
        let dest = try Child("destination guest", ["guest", "resume", "--source", "\(address):\(port)", "--run-for", "\(after)",
                                                   "--json", "--report-ms", "\(reportMs)", "--key-file", keyFile, "--encryption", encryption.rawValue]
                                                   + (postcopy ? ["--handoff", socket, "--memory", memory.rawValue, "--postcopy", self.postcopy.rawValue] : ["--stop-and-copy"])
                                                   + (tasks > 0 ? ["--tasks", "\(tasks)", "--think", "\(think)", "--work-window-ms", "\(workWindowMs)"] : [])
                                                   + (apf ? ["--apf"] : []))
        children.append(dest)
        guard dest.waitFor(\.ready, seconds: 60) != nil else { throw abort("the destination guest did not get ready") }
        // The daemon has taken the VMM's memory over (and preallocated it): no
        // allocation is left for after the switchover.
        if let d = daemon {
            // Not a blind wait: a refused handoff (the daemon says why) or a
            // destination guest that gave up ends it at once.
            let deadline = nowNanoseconds() + 300_000_000_000
            while d.waitFor(\.prepared, seconds: 0.1) == nil {
                if let r = d.first(\.refused) { throw abort("the destination daemon refused the guest's handoff: \(r.reason)") }
                if nowNanoseconds() > deadline || !dest.process.isRunning || !d.process.isRunning || d.first(\.session) != nil {
                    throw abort("the destination daemon did not take the guest's memory over")
                }
            }
        }
        let wait = Double(bootedAt) / 1e9 + before - Double(nowNanoseconds()) / 1e9
        if wait > 0 { usleep(useconds_t(wait * 1e6)) }
        if precopy == "off" {
            say("switching over: pausing the source guest")
        } else {
            say("migrating: precopy (\(precopy)) while the source guest runs, then the switchover")
        }
        source.send("migrate")
        guard let resumed = dest.waitFor(\.resumed, seconds: 60) else { throw abort("the destination guest did not resume") }
        let downtime = Int(exactly: resumed.downtimeNs) ?? -1
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

        let paused = source.first(\.paused)
        let pausedAt = paused.map { Int($0.pausedAtNs) } ?? 0
        let migratingAt = source.first(\.migrating).map { Int($0.tNs) } ?? pausedAt
        let resumedAt = Int(resumed.resumedAtNs)
        // Stop-and-copy has every page in at the first instruction.
        let completedAt = postcopy ? daemon?.first(\.complete).map { Int($0.completedAtNs) } : resumedAt
        let session = daemon?.first(\.session)
        let sourceDone = source.first(\.sourceDone)
        let verified = dest.first(\.verified)
        func rates(_ c: Child, _ range: Range<Int>) -> [Int] {
            c.all.compactMap(\.ops).compactMap { e -> Int? in range.contains(Int(e.tNs)) ? e.opsPerS : nil }
        }
        func mean(_ v: [Int]) -> Int? { v.isEmpty ? nil : v.reduce(0, +) / v.count }
        let beforeOps = rates(source, 0..<migratingAt)
        let precopyOps = rates(source, migratingAt..<pausedAt)
        let duringOps = rates(dest, resumedAt..<max(resumedAt, completedAt ?? Int.max))  // none in pure precopy
        let afterOps = completedAt.map { rates(dest, $0..<Int.max) } ?? []
        let latency = session?.faultLatency
        let ok = destStatus == 0 && daemonStatus == 0 && sourceStatus == 0 && verified?.ok == true
            && (!postcopy || session?.completed == true)
        var reasons: [String] = []
        if !ok {
            for c in children where c.process.terminationStatus != 0 {
                let lastLine = c.errors.split(separator: "\n").last.map(String.init) ?? "exit status \(c.process.terminationStatus)"
                reasons.append("\(c.name): \(lastLine)")
            }
            if verified?.ok != true { reasons.append("integrity check failed or did not run") }
        }
        let rel: (Int) -> Double = { Double($0 - pausedAt) / 1e9 }
        let opsSeries: (Child) -> [[Double]] = { c in c.all.compactMap(\.ops).map { [rel(Int($0.tNs)), Double($0.opsPerS)] } }
        let progress = (session?.progress ?? []).map { p in [rel(Int(p[0])), Double(p[1]), Double(p[2]), Double(p[3])] }
        var result: [String: Any] = [
            "mode": mode.rawValue, "memory_bytes": shape.size.bytes, "workload": workload, "vcpus": vcpus, "transport": transport.rawValue,
            "transport_used": session?.transport ?? (postcopy ? "unknown" : "tcp"),
            "zipf_skew": shape.zipfSkew, "write_percent": shape.effectiveWritePercent,
            "background_rate": backgroundRate.bytes, "before_seconds": before, "after_seconds": after,
            "downtime_ns": downtime, "ok": ok, "reasons": reasons,
            "downtime_breakdown_ns": ["device_state_received": resumed.deviceStateReceivedNs,
                                      "restore": resumed.restoreNs, "all_pages_in": resumed.allPagesInNs ?? 0,
                                      "source_stop": paused?.stopNs ?? 0],
            "ops_series_source": opsSeries(source), "ops_series_destination": opsSeries(dest),
            "progress": progress, "fault_latency_cdf": session?.faultLatencyCDF ?? [],
            "stall_seconds": session?.stallSeconds ?? 0, "zero_pages": session?.zeroPages ?? 0,
            "zero_pages_mapped_ahead": session?.zeroPagesMappedAhead ?? 0,
            "bytes_received": session?.bytesReceived ?? sourceDone?.bytesSent ?? 0,
            "bytes_sent": session?.bytesSent ?? 0,
            "encryption": encryption.rawValue, "encrypted": session?.encrypted ?? false, "bytes_decrypted": session?.bytesDecrypted ?? 0,
            "source_cpu_seconds": sourceDone?.cpuSeconds ?? 0, "daemon_cpu_seconds": session?.cpuSeconds ?? 0,
            "daemon_cpu_seconds_to_full_copy": session?.cpuSecondsToFullCopy ?? 0,
            "daemon_rss_outside_guest_max_bytes": session?.rssOutsideGuestMaxBytes ?? 0,
            "daemon_rss_outside_guest_idle_bytes": session?.rssOutsideGuestIdleBytes ?? 0,
            "prefetch": session?.prefetch ?? "off", "prefetch_pages": session?.prefetchPages ?? 0,
            "prefetch_requested_pages": session?.prefetchRequestedPages ?? 0,
            "prefetch_hits": session?.prefetchHits ?? 0, "prefetch_late_hits": session?.prefetchLateHits ?? 0,
            "prefetch_pages_on_demand_channel": session?.prefetchPagesOnDemandChannel ?? 0,
            "demand_request_latency": session?.demandRequestLatency.flatMap(jsonObject) ?? [String: Any](),
            "pages_sent_twice": sourceDone?.pagesSentTwice ?? 0,
            "pages_touched_before_full_copy": verified?.pagesTouchedBeforeFullCopy ?? -1,
            "ops_per_s_before": beforeOps, "ops_per_s_during": duringOps, "ops_per_s_after": afterOps,
            "ops_per_s_precopy": precopyOps,
            // The destination's first report covers its first 100 ms: the
            // guest's speed right after the switch, however short postcopy was.
            "ops_per_s_first_at_destination": rates(dest, resumedAt..<Int.max).first ?? 0, "precopy": precopy, "postcopy_after_precopy": self.postcopy == .on, "pause_reason": paused?.reason ?? "",
            "precopy_seconds": Double(pausedAt - migratingAt) / 1e9,
            "source_precopy": sourceDone?.precopy.flatMap(jsonObject) ?? [String: Any](),
            "precopy_passes": session?.precopyPasses ?? 0, "precopy_pages": session?.precopyPages ?? 0,
            "precopy_stale_pages": session?.precopyStalePages ?? 0, "clean_pages_mapped": session?.cleanPagesMapped ?? 0,
            "clean_pages_released": session?.cleanPagesReleased ?? 0,
            "clean_page_faults": session?.cleanPageFaults ?? 0, "faults_parked_on_final_set": session?.faultsParkedOnFinalSet ?? 0,
            "final_set_after_pause_ns": (session?.finalSetAppliedAtNs ?? 0) > 0 ? Int(session!.finalSetAppliedAtNs) - pausedAt : 0,
            // From the pause to the daemon serving (its setup after the pause: connections, engine).
            "engine_started_after_pause_ns": (session?.engineStartedAtNs ?? 0) > 0 ? Int(session!.engineStartedAtNs) - pausedAt : 0,
            "final_set_received_after_pause_ns": (session?.finalSetReceivedAtNs ?? 0) > 0 ? Int(session!.finalSetReceivedAtNs) - pausedAt : 0,
            "fault_latency": latency.flatMap(jsonObject) ?? [String: Any](),
            "integrity": verified.flatMap { jsonObject(GuestEvent.verified($0)) } ?? [String: Any](),
            "demand_pages": session?.demandPages ?? 0, "background_pages": session?.backgroundPages ?? 0,
            "faults": session?.faults ?? 0,
            "install_path": session?.installPath ?? "none", "preallocation_seconds": session?.preallocationSeconds ?? 0,
            "pages_copied": session?.pagesCopied ?? 0, "pages_continued": session?.pagesContinued ?? 0,
            "pages_received_in_place": session?.pagesReceivedInPlace ?? 0,
            "streamed_pages_held": session?.streamedPagesHeld ?? 0, "streamed_pages_released": session?.streamedPagesReleased ?? 0,
            "exit_status": ["source": sourceStatus, "daemon": daemonStatus, "destination": destStatus],
        ]
        if let w = dest.first(\.taskWork) { result["task_work"] = jsonObject(GuestEvent.taskWork(w)) }
        if let completedAt {
            let t = Double(completedAt - pausedAt) / 1e9
            result["time_to_full_copy_seconds"] = t
            // From "migrate" (precopy's start) to every page in: hybrid's cost against pure postcopy.
            result["total_migration_seconds"] = Double(completedAt - migratingAt) / 1e9
            let bytes = session?.bytesReceived ?? sourceDone?.bytesSent ?? 0
            if t > 0 { result["stream_bytes_per_second"] = Double(bytes) / t }
            if let cpu = session?.cpuSecondsToFullCopy, bytes > 0 { result["daemon_cpu_seconds_per_gib"] = cpu / (Double(bytes) / Double(1 << 30)) }
        }
        let kind = mode == .stopAndCopy ? "stop-and-copy" : precopy == "off" ? "postcopy" : self.postcopy == .on ? "hybrid" : "pure precopy"
        result["migration"] = kind
        // Shared memory in huge folios (the host's setting): after the switch the
        // destination guest's faults map 2 MiB at a time instead of 4 KiB.
        let shmemTHP = MemoryMapping.sharedHugePagesSetting ?? "unknown"
        result["shmem_thp"] = shmemTHP
        if json {
            emitEvent(result)
        } else {
            let fmtOps: ([Int]) -> String = { v in mean(v).map { "\(fixed(Double($0) / 1e6, 2)) M" } ?? "n/a" }
            let perSecond: ([Int]) -> String = { v in v.map { "\(fixed(Double($0) / 1e6, 1))" }.joined(separator: " ") }
            let ns: (KeyPath<LatencySummary, UInt64>) -> String = { k in formatDuration(ns: latency?[keyPath: k] ?? 0) }
            let unknown: (Int?) -> String = { $0.map { "\($0)" } ?? "?" }
            print("""
                \(kind) migration of a running \(formatBytes(Double(shape.size.bytes))) guest (\(workload), \(vcpus) vCPUs) over \(session?.transport ?? "tcp"): \(ok ? "OK" : "FAILED")
                  downtime            \(formatDuration(ns: UInt64(max(downtime, 0)))) (source pause to first instruction at the destination)
                  time to full copy   \(completedAt.map { fixed(Double($0 - pausedAt) / 1e9, 3) + " s after the pause" } ?? "not reached")
                  guest ops/s         before \(fmtOps(beforeOps))   during postcopy \(fmtOps(duringOps))   after \(fmtOps(afterOps))  
                                      M ops/s every 100 ms: before [\(perSecond(Array(beforeOps.suffix(10))))] during [\(perSecond(duringOps))] after [\(perSecond(Array(afterOps.prefix(10))))]
                  precopy             \(precopy == "off" ? "off" : "\(precopy): \(sourceDone?.precopy?.passes.count ?? 0) pass(es) of \(sourceDone?.precopy?.passes.map(String.init).joined(separator: ", ") ?? "") pages in \(fixed(Double(pausedAt - migratingAt) / 1e9, 3)) s; paused: \(paused?.reason ?? "?"); final dirty set \(sourceDone?.precopy?.finalDirtyPages.map(String.init) ?? "?") pages, \(session?.cleanPagesReleased ?? 0) clean pages left to the guest's own faults and \(session?.cleanPagesMapped ?? 0) mapped, without a transfer; guest ops/s during precopy \(fmtOps(precopyOps))")
                  shared memory THP   \(shmemTHP) (/sys/kernel/mm/transparent_hugepage/shmem_enabled; with advise, guest RAM and the daemon's alias ask for 2 MiB folios)
                  encryption          \(session.map { $0.encrypted ? "AES-256-GCM (\(StreamKeys.library)): \(formatBytes(Double($0.bytesDecrypted))) decrypted by the daemon, \(formatBytes(Double($0.bytesReceived))) on the wire" : encryption == .off ? "off (authenticated, in clear)" : "control only (pages READ over \($0.transport) in clear)" } ?? (encryption == .on ? "on" : "off"))
                  install path        \(session.map { $0.installPath == "copy" ? "copy (anonymous RAM, UFFDIO_COPY)" : "continue (shared RAM preallocated in \(fixed($0.preallocationSeconds, 3)) s before the switchover, UFFDIO_CONTINUE)" } ?? "none (stop-and-copy)")
                  daemon CPU          \((result["daemon_cpu_seconds_per_gib"] as? Double).map { fixed($0, 3) + " s per GiB received, from the engine's start to the full copy" } ?? "-")
                  daemon memory       \(session.map { "\(formatBytes(Double($0.rssOutsideGuestMaxBytes))) resident outside guest memory at most (\(formatBytes(Double($0.rssOutsideGuestIdleBytes))) when it started)" } ?? "-")
                  pages               \(session?.demandPages ?? 0) demanded, \(session?.backgroundPages ?? 0) streamed, \(session?.faults ?? 0) faults
                  fault service       p50 \(ns(\.p50Ns))  p90 \(ns(\.p90Ns))  p99 \(ns(\.p99Ns))  p99.9 \(ns(\.p999Ns))  max \(ns(\.maxNs))
                  integrity           \(verified?.ok == true ? "OK" : "FAILED"): \(verified?.kvSlotsVerified ?? 0) key-value checksums hold (\(unknown(verified?.kvSlotsFailed)) failed, \(verified.map { "\($0.getChecksumFailures)" } ?? "?") failed GETs); \(verified?.pagesVerified ?? 0) pages equal the source's RAM at pause, \(unknown(verified?.pagesMismatched)) differ (\(verified?.pagesVerifiedBeforeFirstWrite ?? 0) of them written at the destination were digested just before their first write)\(verified?.mismatchedPages.map { "; the first differing pages: \($0.map(String.init).joined(separator: " "))" } ?? "")
                """)
        }
        if !ok {
            for c in children where !c.errors.isEmpty { FileHandle.standardError.write(Data("\(c.name): \(c.errors.suffix(2000))\n".utf8)) }
            throw ExitCode(3)
        }
    }
}

/// `migrate --mode`.
enum MigrationMode: String, CaseIterable, ExpressibleByArgument {
    case postcopy
    case stopAndCopy = "stop-and-copy"
}
