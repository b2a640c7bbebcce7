import ArgumentParser
import Foundation
import PostcopyCore
import PostcopyHandoff
import PostcopyTransport

struct RestoreCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "restore",
        abstract: "Restore one paused guest snapshot many times through the VMM handoff, with and without a replayed working set, and report how fast each restored guest did its first work.",
        discussion: """
            The serverless cold-start case (REAP, FaaSnap): one memory snapshot restored again and \
            again. A reference guest boots, runs --before seconds, and pauses: its frozen RAM and device \
            state are the snapshot, served by it to every restore. The first restore records the \
            working set (the destination daemon's --record-working-set: the pages faulted on, demand \
            only, until that guest finished its first --work-ops, which it tells the daemon, or \
            --record-seconds after the first fault, whichever comes first); then --restores restores without the \
            working set and --restores with it replayed (--replay-working-set), alternated. Each one is \
            a fresh daemon and a fresh destination guest; it reports the time from the resume until the \
            guest had done --work-ops operations, the summed vCPU stall, the demand faults and the \
            pages replayed, and checks integrity (every page against the snapshot). Prints the medians \
            and replay's speed-up, or one JSON object with --json.
            """)

    @OptionGroup var shape: GuestShape
    @Option(name: .long, help: "Seconds the guest runs before it is paused into the snapshot.") var before: Double = 2
    @Option(name: .long, help: "Restores without and with the working set (each).") var restores: Int = 5
    @Option(name: .long, help: "The guest's first work after each restore: this many operations.") var workOps: UInt64 = 2_000_000
    @Option(name: .long, help: "The recording restore's window after its first fault, in seconds (the longest it lasts, with --record-until-work).") var recordSeconds: Double = 1
    @Flag(name: .long, inversion: .prefixedNo, help: "End the recording restore's window when its guest has done its first --work-ops (the pages that work needed, as REAP records a first invocation), or after --record-seconds if that comes first; with --no-record-until-work, always after --record-seconds.") var recordUntilWork = true
    @Option(name: .long, help: "Seconds each restored guest runs (its work must fit).") var runFor: Double = 3
    @Option(name: .long, help: "The destination daemons' prefetch: adaptive or off.") var prefetch: String = "adaptive"
    @Flag(name: .long, help: "One JSON object on stdout instead of the summary.") var json = false

    func validate() throws {
        guard before > 0, runFor > 0, recordSeconds > 0 else { throw ValidationError("--before, --run-for and --record-seconds must be positive") }
        guard (1...50).contains(restores) else { throw ValidationError("--restores must be 1...50") }
        guard workOps > 0 else { throw ValidationError("--work-ops must be positive") }
        guard ["adaptive", "off"].contains(prefetch) else { throw ValidationError("--prefetch must be adaptive or off") }
    }

    struct Run {
        var index: Int, kind: String
        var timeToWorkNs: UInt64?, stallSeconds: Double, demandPages: UInt64, replayPages: UInt64, faults: UInt64, zeroFaults: UInt64
        var recordedPages: Int?, refused: String?, fullCopySeconds: Double?, ok: Bool
        /// From the resume to the replay's last request.
        var replayRequestedNs: Int?

        var json: [String: Any] {
            ["index": index, "working_set": kind, "time_to_work_ns": timeToWorkNs.map { Int($0) } ?? -1, "stall_seconds": stallSeconds,
             "demand_pages": demandPages, "replay_pages": replayPages, "faults": faults, "zero_page_faults": zeroFaults, "recorded_pages": recordedPages ?? -1,
             "refused": refusedText, "time_to_full_copy_seconds": fullCopySeconds ?? -1, "ok": ok, "replay_requested_after_resume_ns": replayRequestedNs ?? -1]
        }
        var refusedText: String { refused ?? "" }
    }

    func run() throws {
        let tag = "\(getpid())"
        let keyFile = "/tmp/postcopy-restore-\(tag).key"
        let wsFile = "/tmp/postcopy-restore-\(tag).ws"
        defer { unlink(keyFile); unlink(wsFile) }
        let keyText = Authentication.nonce().map { String($0, radix: 16) }.joined() + "\n"
        guard FileManager.default.createFile(atPath: keyFile, contents: Data(keyText.utf8), attributes: [.posixPermissions: 0o600]) else {
            throw fail("cannot create \(keyFile)")
        }
        let say: (String) -> Void = { if !json { FileHandle.standardError.write(Data(($0 + "\n").utf8)) } }
        let kinds = ["record"] + (0..<restores).flatMap { _ in ["off", "replay"] }
        say("booting a \(shape.size.text) guest (\(shape.workload.rawValue), \(shape.vcpus) vCPUs): its state after \(before) s is the snapshot, restored \(kinds.count) times")
        let source = try Child("snapshot (paused guest)", ["guest", "run", "--size", shape.size.text, "--workload", shape.workload.rawValue,
                                                           "--vcpus", "\(shape.vcpus)", "--zipf-skew", "\(shape.zipfSkew)",
                                                           "--write-percent", "\(shape.effectiveWritePercent)", "--listen", "127.0.0.1:0",
                                                           "--json", "--key-file", keyFile, "--serve-sessions", "\(kinds.count)"])
        defer { _ = source.finish(seconds: 0) }
        guard let port = source.waitFor(\.listening, seconds: 120)?.port else { throw fail("the guest did not start: \(Child.tail(of: source.errors))") }
        usleep(useconds_t(before * 1e6))
        source.send("migrate")
        guard source.waitFor(\.paused, seconds: 60) != nil else { throw fail("the guest did not pause: \(Child.tail(of: source.errors))") }
        var runs: [Run] = []
        for (i, kind) in kinds.enumerated() {
            say("restore \(i + 1)/\(kinds.count): working set \(kind)...")
            runs.append(try restore(index: i, kind: kind, port: port, keyFile: keyFile, wsFile: wsFile, tag: tag))
            if kind == "record", runs.last?.recordedPages ?? 0 == 0 { throw fail("the recording restore wrote no working set") }
        }
        let status = source.finish(seconds: 60)
        let off = runs.filter { $0.kind == "off" }, replay = runs.filter { $0.kind == "replay" }
        func median(_ v: [Double]) -> Double? { v.isEmpty ? nil : v.sorted()[v.count / 2] }
        let workOff = median(off.compactMap { $0.timeToWorkNs.map { Double($0) / 1e6 } })
        let workReplay = median(replay.compactMap { $0.timeToWorkNs.map { Double($0) / 1e6 } })
        let stallOff = median(off.map(\.stallSeconds)), stallReplay = median(replay.map(\.stallSeconds))
        let speedup = workOff.flatMap { a in workReplay.map { b in b > 0 ? a / b : 0 } }
        let ok = runs.allSatisfy(\.ok) && status == 0 && runs.allSatisfy { $0.timeToWorkNs != nil }
        if json {
            let doc: [String: Any] = [
                "size": shape.size.bytes, "workload": shape.workload.rawValue, "vcpus": shape.vcpus, "work_ops": workOps,
                "record_seconds": recordSeconds, "record_until_work": recordUntilWork, "run_for": runFor, "prefetch": prefetch, "runs": runs.map(\.json), "ok": ok,
                "median_time_to_work_ms": ["off": workOff as Any, "replay": workReplay as Any],
                "median_stall_seconds": ["off": stallOff as Any, "replay": stallReplay as Any],
                "replay_speedup": speedup as Any, "recorded_pages": runs.first?.recordedPages ?? 0,
            ]
            emitEvent(doc)
        } else {
            for r in runs {
                print("restore \(r.index + 1) \(r.kind.padding(toLength: 6, withPad: " ", startingAt: 0)) first \(workOps) ops in \(r.timeToWorkNs.map { formatDuration(ns: $0) } ?? "(not done)"), stall \(fixed(r.stallSeconds, 3)) s, \(r.demandPages) demand pages, \(r.replayPages) replayed\(r.recordedPages.map { ", \($0) pages recorded" } ?? "")\(r.refused.map { ", REFUSED: \($0)" } ?? ""), integrity \(r.ok ? "OK" : "FAILED")")
            }
            print("median time to the first \(workOps) ops: \(workOff.map { fixed($0, 1) } ?? "-") ms without the working set, \(workReplay.map { fixed($0, 1) } ?? "-") ms with it replayed = \(speedup.map { fixed($0, 2) } ?? "-")x; stall \(stallOff.map { fixed($0, 3) } ?? "-") vs \(stallReplay.map { fixed($0, 3) } ?? "-") s")
        }
        if !ok { throw ExitCode(3) }
    }

    private func restore(index: Int, kind: String, port: Int, keyFile: String, wsFile: String, tag: String) throws -> Run {
        let socket = "/tmp/postcopy-restore-\(tag)-\(index).sock"
        defer { unlink(socket) }
        let wsArgs: [String] = kind == "record" ? ["--record-working-set", wsFile, "--record-seconds", "\(recordSeconds)"]
            : kind == "replay" ? ["--replay-working-set", wsFile] : []
        let daemon = try Child("destination daemon", ["dest", "--handoff", socket, "--connect", "127.0.0.1:\(port)", "--once", "--json",
                                                      "--key-file", keyFile, "--prefetch", prefetch] + wsArgs)
        defer { _ = daemon.finish(seconds: 0) }
        guard daemon.waitFor(\.listening, seconds: 30) != nil else { throw fail("restore \(index + 1): the daemon did not start: \(Child.tail(of: daemon.errors))") }
        let guest = try Child("restored guest", ["guest", "resume", "--source", "127.0.0.1:\(port)", "--handoff", socket, "--memory", "shared",
                                                 "--run-for", "\(runFor)", "--json", "--key-file", keyFile, "--work-ops", "\(workOps)",
                                                 "--resume-on-stdin"] + (kind == "record" && recordUntilWork ? ["--end-recording-after-work"] : []))
        defer { _ = guest.finish(seconds: 0) }
        // As a warm host would: the daemon has the memory (preallocated) before the guest resumes.
        guard guest.waitFor(\.ready, seconds: 60) != nil, daemon.waitFor(\.prepared, seconds: 120) != nil else {
            throw fail("restore \(index + 1): the daemon did not take the guest's memory over: \(Child.tail(of: daemon.errors)) \(Child.tail(of: guest.errors))")
        }
        guest.send("resume")
        let guestStatus = guest.finish(seconds: runFor + 300)
        let daemonStatus = daemon.finish(seconds: 60)
        let verified = guest.first(\.verified)
        let session = daemon.first(\.session)
        let ok = guestStatus == 0 && daemonStatus == 0 && verified?.ok == true && session?.completed == true
        if !ok {
            FileHandle.standardError.write(Data("restore \(index + 1) (\(kind)) failed: guest exit \(guestStatus), daemon exit \(daemonStatus)\n\(Child.tail(of: guest.errors))\n\(Child.tail(of: daemon.errors))\n".utf8))
        }
        return Run(index: index, kind: kind, timeToWorkNs: verified?.timeToWorkNs, stallSeconds: session?.stallSeconds ?? 0,
                   demandPages: session?.demandPages ?? 0, replayPages: session?.replayPages ?? 0, faults: session?.faults ?? 0,
                   zeroFaults: session?.zeroPagesFaulted ?? 0,
                   recordedPages: session?.workingSetRecordedPages, refused: session?.workingSetRefused,
                   fullCopySeconds: session?.timeToFullCopySeconds, ok: ok,
                   replayRequestedNs: guest.first(\.resumed).flatMap { r in
                       (session?.replayRequestedAtNs ?? 0) > 0 ? Int(session!.replayRequestedAtNs) - Int(r.resumedAtNs) : nil
                   })
    }
}
