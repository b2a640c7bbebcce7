import ArgumentParser
import CPostcopy
import Foundation
import PostcopyCore
import PostcopyDestination
import PostcopyGuest
import PostcopyHandoff
import PostcopyTransport
import Synchronization

struct GuestResumeCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "resume",
        abstract: "Resume the guest at the destination over empty memory handed to a page-fault daemon.",
        discussion: """
            Plays a Firecracker-style VMM: maps fresh guest RAM, creates a userfaultfd (with \
            UFFD_FEATURE_EVENT_REMOVE), registers the RAM, hands both to the daemon at --handoff, then \
            (with --memory shared, the default: a memfd, registered MISSING | MINOR and handed over \
            too, so the daemon writes pages through its own preallocated alias and maps them with \
            UFFDIO_CONTINUE; --memory anonymous: Firecracker's plain message, UFFDIO_COPY), then \
            waits for the source guest's device state and resumes the vCPUs at once: every page they \
            touch is faulted in by the daemon. After --run-for seconds it stops and checks integrity: \
            every key-value checksum, and every page it did not write against the source's page digests.
            """)

    @Option(name: .long, help: "The daemon's handoff socket (not needed with --stop-and-copy).") var handoff: String?
    @Flag(name: .long, help: "Baseline: copy all RAM while paused, then resume (no userfaultfd, no daemon).") var stopAndCopy = false
    @Option(name: .long, help: "Source address, HOST:PORT (device state and page digests).") var source: Endpoint
    @Option(name: .long, help: "Name this source (HOST:PORT) in the handoff, so that a daemon serving VMMs from several sources fetches this guest's pages there rather than from its own --connect.") var handoffSource: Endpoint?
    @Option(name: .long, help: "Guest RAM handed to the daemon: shared (a memfd; the daemon installs by UFFDIO_CONTINUE) or anonymous (UFFDIO_COPY). Ignored with --stop-and-copy.") var memory: GuestMemoryKind = .shared
    @Option(name: .long, help: "off: pure precopy (the source ran with --precopy N|auto --postcopy off): the vCPUs resume only once the daemon says every page is in, so the guest never faults a page over the network.") var postcopy: Toggle = .on
    @Option(name: .long, help: "Seconds to run at the destination before checking integrity.") var runFor: Double = 5
    @Option(name: .long, help: "Milliseconds between two ops/s reports.") var reportMs: Int32 = 1000
    @Flag(name: .long, help: "After the handoff, wait for a line \"resume\" on stdin before fetching the device state (restoring a snapshot that is there already: `postcopy restore` says when the daemon is ready).") var resumeOnStdin = false
    @Option(name: .long, help: "Report how long after resuming the guest had done this many operations (its first work after a restore; 0: not measured).") var workOps: UInt64 = 0
    @Flag(name: .long, help: "Once the guest has done its --work-ops, tell the daemon the recorded work is done: a daemon recording the working set (--record-working-set) ends its window then, so that the record holds the pages that work needed, however fast this machine is.") var endRecordingAfterWork = false
    @Option(name: .long, help: "Run a task guest instead of the key-value workload: this many cooperative tasks per vCPU thread, each reading random words of random pages.") var tasks: Int = 0
    @Flag(name: .long, help: "Paravirtual async page faults for the task guest: RAM registered with UFFD_FEATURE_SIGBUS, a touched missing page parks the task (\"page not present\") and the vCPU runs another one until \"page ready\".") var apf = false
    @Option(name: .long, help: "Arithmetic iterations per read in the task guest (compute between memory touches).") var think: UInt32 = 100
    @Option(name: .long, help: "Milliseconds after resuming at which the task guest's work is counted (the same interval for every run).") var workWindowMs: Int = 1000
    @OptionGroup var io: GuestIOOptions
    var key: KeyOptions { io.key }
    var json: Bool { io.json }

    func validate() throws {
        guard (0...GuestLimits.maxTasksPerVCPU).contains(tasks) else { throw ValidationError("--tasks must be 0...\(GuestLimits.maxTasksPerVCPU)") }
        guard !apf || (tasks > 0 && handoff != nil && !stopAndCopy) else { throw ValidationError("--apf needs --tasks N and --handoff") }
        guard workWindowMs > 0 else { throw ValidationError("--work-window-ms must be positive") }
        guard runFor > 0 else { throw ValidationError("--run-for must be positive") }
        guard !endRecordingAfterWork || (workOps > 0 && handoff != nil) else { throw ValidationError("--end-recording-after-work needs --work-ops N and --handoff") }
        guard stopAndCopy || handoff != nil else { throw ValidationError("--handoff is required unless --stop-and-copy") }
        guard postcopy == .on || (!stopAndCopy && tasks == 0) else { throw ValidationError("--postcopy off needs --handoff and the key-value guest (no --tasks, no --stop-and-copy)") }
    }

    /// The page-fault daemon went away before every page was in (or refused
    /// the handoff): this guest cannot go on (its vCPUs wait on faults nobody
    /// will serve; its source still holds the paused guest), so the VMM exits
    /// at once, status 3, saying why.
    static func daemonGone(_ why: String) -> Never {
        FileHandle.standardError.write(Data("error: the page-fault daemon is gone before every page was in (\(why)); this guest cannot run here, its source still holds it\n".utf8))
        _exit(3)
    }

    func run() throws {
        if let reason = Userfaultfd.unavailableReason() { throw fail(reason) }
        // Device state and digests; with --stop-and-copy also every page, in its batches.
        let control = TCPTransport(endpoint: source, maxBatchPages: StopAndCopy.batchPages, authKey: try key.loadKey(),
                                   encryption: try key.streamEncryption())
        let info: SessionInfo
        do { info = try control.connect() } catch { throw fail("cannot reach the source: \(error)") }
        let bytes = info.table.totalPages * info.table.pageSize
        let postcopy = handoff != nil && !stopAndCopy
        let shared = postcopy && memory == .shared ? try MemoryMapping.sharedMemfd(length: bytes, hugePages: true) : nil
        let ram = try shared?.guest ?? MemoryMapping.anonymous(length: bytes)
        var uffd: Userfaultfd?
        var vmm: VMMHandoffClient?
        var apfChannel: APFGuestChannel?
        if let handoff, !stopAndCopy {
            // Guest RAM and its uffd, exactly as Firecracker sets them up.
            // With --apf, a touch of a missing page raises SIGBUS in the touching
            // thread instead of blocking it (the guest library turns it into an async fault).
            // Shared memory also gets MINOR faults (a page in the file's page cache
            // but not mapped yet), which the daemon resolves with UFFDIO_CONTINUE.
            let u = try Userfaultfd(features: CPC_UFFD_FEATURE_EVENT_REMOVE | (apf ? CPC_UFFD_FEATURE_SIGBUS : 0)
                                    | (shared != nil ? CPC_UFFD_FEATURE_MINOR_SHMEM : 0))
            if shared != nil { try u.registerMissingAndMinor(ram.range) } else { try u.registerMissing(ram.range) }
            uffd = u
            let client: VMMHandoffClient
            do { client = try VMMHandoffClient(path: handoff) } catch { throw fail("cannot reach the daemon at \(handoff): \(error)") }
            vmm = client
            let region = VMMRegion(base: ram.address, size: UInt64(bytes), offset: 0, pageSize: UInt64(info.table.pageSize),
                                   file: shared.map { _ in .init(index: 0, offset: 0) }, source: handoffSource?.description)
            do { try client.handOver([region], uffd: u.fd.raw, files: shared.map { [$0.file.raw] } ?? []) } catch {
                throw fail("handoff sendmsg failed: \(error)")
            }
            // Told by the daemon when every page is in: pure precopy resumes
            // then; postcopy counts the pages the guest touched until then.
            do { try client.requestCompletionNotice() } catch { throw fail("asking the daemon for its completion notice failed: \(error)") }
            if apf {
                // The guest enables async page faults (like writing KVM's async-PF MSR).
                let ch = try APFGuestChannel()
                apfChannel = ch
                do { try client.enableAPF(fds: ch.fds) } catch { throw fail("sending the APF channel failed: \(error)") }
            }
        }
        if json { emitEvent(.ready(.init(memoryBytes: bytes))) } else { print("destination ready: waiting for the source to pause") }
        if resumeOnStdin {
            // A restore: the snapshot is there already; resume when told
            // (once the daemon has taken the memory over).
            while let line = readLine(), line.trimmingCharacters(in: .whitespaces) != "resume" {}
        }

        // Like QEMU's -incoming: everything is set up; only the device state is missing.
        let blob: [UInt8]
        do { blob = try control.fetchDeviceState(timeoutMs: 3_600_000) } catch { throw fail("no device state from the source: \(error)") }
        let receivedAt = nowNanoseconds()
        let state: GuestDeviceState
        do { state = try GuestDeviceState.decode(blob) } catch { throw fail("device state is not a reference guest's: \(error)") }
        guard state.memoryBytes == bytes else { throw fail("device state is for \(state.memoryBytes) bytes of RAM, the source serves \(bytes)") }
        let baseline = stopAndCopy ? StopAndCopy(control: control, table: info.table) : nil
        try baseline?.copy(into: ram, json: json)
        var pagesInNs: UInt64?
        if self.postcopy == .off, let vmm {
            // The rest is copied while the guest stays paused.
            let answer: CompletionNotice.Answer
            do { answer = try vmm.waitForCompletion(timeoutMs: 3_600_000) } catch { throw fail("pure precopy: \(error)") }
            guard answer.complete else { throw fail("pure precopy: the daemon failed before every page was in: \(answer.error ?? "no reason given")") }
            pagesInNs = nowNanoseconds() &- state.pausedAtNs
        }
        if tasks > 0 {
            try runTaskGuest(ram: ram, state: state, receivedAt: receivedAt, control: control, info: info, channel: apfChannel,
                             baseline: baseline)
            withExtendedLifetime((uffd, vmm, shared)) {}
            return
        }
        let postcopyWindow = vmm != nil && self.postcopy == .on
        let guest = try ReferenceGuest(base: ram.base, memoryBytes: bytes, workload: state.workload, vcpus: state.vcpus, trackDirty: true,
                                       zipfSkew: state.zipfSkew, writePercent: state.writePercent, recordTouches: postcopyWindow)
        guest.start()
        let resumedAt = guest.release()
        // Distinct pages the guest touched while postcopy ran (until every page was in).
        let touched = Locked<Int?>(nil)
        // Watches the daemon until every page is in: the touches count until
        // then (within the run); a daemon that goes away first, or refused the
        // handoff, ends this VMM (`daemonGone`): nobody serves its faults, and
        // its memory must never be read as zeros.
        let stopWatching = Atomic<Bool>(false)
        let watcher = postcopyWindow ? PThread(name: "full-copy") { [runFor, vmm] in
            let deadline = resumedAt + UInt64((runFor + 1) * 1e9)
            var recording = true
            while !stopWatching.load(ordering: .relaxed) {
                let answer: CompletionNotice.Answer
                do { answer = try vmm!.waitForCompletion(timeoutMs: 200) } catch {
                    if vmm!.closedByDaemon(within: 0) { Self.daemonGone("\(error)") }
                    if recording, nowNanoseconds() >= deadline {
                        _ = guest.stopRecordingTouches()
                        recording = false
                    }
                    continue
                }
                guard answer.complete else { Self.daemonGone(answer.error ?? "the daemon gave up") }
                if recording { touched.withLock { $0 = guest.stopRecordingTouches() } }
                return
            }
        } : nil
        let downtime = resumedAt &- state.pausedAtNs
        if json {
            emitEvent(.resumed(.init(resumedAtNs: resumedAt, downtimeNs: downtime, deviceStateReceivedNs: receivedAt &- state.pausedAtNs,
                                     restoreNs: resumedAt - receivedAt, allPagesInNs: pagesInNs)))
        } else {
            print("resumed: downtime \(formatDuration(ns: downtime))")
        }
        // The source's page digests (ready once its RAM was scanned after the pause).
        let digests = Locked<[UInt64]?>(nil)
        let table = info.table
        let fetcher = PThread(name: "digests") {
            guard let all = try? control.fetchAllPageDigests(table) else { return }
            digests.withLock { $0 = all }
            baseline?.confirmComplete()
        }
        let reporter = try OpsReporter(side: "destination", json: json, intervalMs: reportMs) { guest.totalOps }
        // How long the guest took for its first `workOps` operations.
        let workDone = Locked<UInt64?>(nil)
        let endRecording = endRecordingAfterWork ? vmm : nil
        let workWatch = workOps > 0 ? PThread(name: "work") { [workOps, runFor] in
            let deadline = resumedAt + UInt64(runFor * 1e9)
            while nowNanoseconds() < deadline {
                if guest.totalOps >= workOps {
                    workDone.withLock { $0 = nowNanoseconds() - resumedAt }
                    // (A daemon gone meanwhile is seen by the full-copy watch.)
                    try? endRecording?.endRecording()
                    return
                }
                usleep(200)
            }
        } : nil
        usleep(useconds_t(runFor * 1e6))
        _ = guest.pause(pausedAt: nowNanoseconds())
        stopWatching.store(true, ordering: .relaxed)
        reporter.finish()
        fetcher.join()
        watcher?.join()
        workWatch?.join()
        control.close()
        let store = guest.verifyStore()
        guard let sourceDigests = digests.withLock({ $0 }) else { throw fail("could not fetch the source's page digests") }
        let pagesCheck = guest.verifyPages(against: sourceDigests)
        let failures = guest.integrityFailures
        let ok = store.failed == 0 && pagesCheck.mismatched == 0 && failures == 0
        let result = GuestEvent.verified(.init(
            ok: ok, kvSlotsVerified: store.verified, kvSlotsFailed: store.failed, getChecksumFailures: failures,
            pagesVerified: pagesCheck.verified, pagesVerifiedBeforeFirstWrite: pagesCheck.verifiedBeforeWrite,
            pagesMismatched: pagesCheck.mismatched, ops: guest.totalOps, pagesTouchedBeforeFullCopy: touched.withLock { $0 },
            timeToWorkNs: workDone.withLock { $0 }, mismatchedPages: pagesCheck.firstMismatched.isEmpty ? nil : pagesCheck.firstMismatched))
        if json { emitEvent(result) } else { print("integrity: \(ok ? "OK" : "FAILED") \(result.line)") }
        vmm?.close()  // the VMM goes away: the daemon releases its session
        withExtendedLifetime((ram, uffd, shared)) {}
        if !ok { throw ExitCode(3) }
    }
}
