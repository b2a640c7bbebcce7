import ArgumentParser
import CPostcopy
import Foundation
import Logging
import PostcopyCore
import PostcopyDestination
import PostcopyGuest
import PostcopyHandoff
import PostcopySource
import PostcopyRDMA
import PostcopyTransport
import PostcopyWire
import Synchronization

/// One JSON object per line on stdout, flushed at once (scripts and `migrate` read it live).
func emitEvent(_ fields: [String: Any]) {
    guard let d = try? JSONSerialization.data(withJSONObject: fields, options: [.sortedKeys]) else { return }
    FileHandle.standardOutput.write(d + Data("\n".utf8))
}

/// Prints the guest's operations per second once a second until stopped.
final class OpsReporter: @unchecked Sendable {
    private let stop: EventFD
    private let thread: PThread

    init(side: String, json: Bool, intervalMs: Int32 = 1000, ops: @escaping @Sendable () -> UInt64) throws {
        let stop = try EventFD()
        self.stop = stop
        thread = PThread(name: "ops-report") {
            var last = ops()
            var lastT = nowNanoseconds()
            while cpc_poll1(stop.fd.raw, Int16(POLLIN), intervalMs) == 0 {
                let now = nowNanoseconds(), cur = ops()
                let rate = Double(cur - last) / (Double(now - lastT) / 1e9)
                if json {
                    emitEvent(["event": "ops", "side": side, "t_ns": now, "ops_per_s": Int(rate)])
                } else {
                    FileHandle.standardError.write("[\(side)] \(Int(rate)) ops/s\n".data(using: .utf8)!)
                }
                last = cur
                lastT = now
            }
        }
    }

    func finish() {
        stop.signal()
        thread.join()
    }
}

/// Size, workload and vCPUs of the reference guest (shared by `guest run` and `migrate`).
struct GuestShape: ParsableArguments {
    @Option(name: .long, help: "Guest RAM size, e.g. 256M, 1G.") var size: String = "1G"
    @Option(name: .long, help: "Workload: kv, scan, random or zipf.") var workload: String = "kv"
    @Option(name: .long, help: "vCPU threads of the guest.") var vcpus: Int = 2
    @Option(name: .long, help: "Skew of the zipf distributions (kv keys, zipf page touches), 0.01-0.999.") var zipfSkew: Double = 0.99

    func validateShape() throws {
        guard let n = parseByteSize(size), n >= 1 << 20, n % 4096 == 0 else { throw ValidationError("--size must be at least 1M and a multiple of 4 KiB") }
        guard Workload(rawValue: workload) != nil else { throw ValidationError("--workload must be kv, scan, random or zipf") }
        guard (1...256).contains(vcpus) else { throw ValidationError("--vcpus must be 1...256") }
        guard zipfSkew > 0, zipfSkew < 1 else { throw ValidationError("--zipf-skew must be between 0 and 1 (exclusive)") }
    }
}

struct GuestCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "guest",
        abstract: "The reference guest: a workload on vCPU threads over guest RAM that can pause at the source and resume at the destination.",
        subcommands: [GuestRunCommand.self, GuestResumeCommand.self])
}

struct GuestRunCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "run",
        abstract: "Run the guest at the source and serve its RAM; pause on a \"pause\" line on stdin.",
        discussion: """
            Boots the guest (fills the key-value store), runs the workload, and serves its RAM to \
            destinations like `postcopy source` does. On a line "pause" on standard input (or after \
            --pause-after seconds) the vCPUs stop at a safe point, the device state is published, and \
            the guest's RAM is frozen and served until a destination completed and every connection closed.
            """)

    @OptionGroup var shape: GuestShape
    @Option(name: .long, help: "Percentage of key-value slots filled at boot (the rest of RAM stays zero).") var fillPercent: Int = 75
    @Option(name: .long, help: "Seed of the workload.") var seed: UInt64 = 1
    @Option(name: .long, help: "Listen address for destinations, HOST:PORT (port 0: any; printed first).") var listen: String = "127.0.0.1:0"
    @Option(name: .long, help: "Guest memory file (default: an anonymous memfd).") var memory: String?
    @Option(name: .long, help: "Pause by itself after this many seconds (default: wait for \"pause\" on stdin).") var pauseAfter: Double?
    @Option(name: .long, help: "Milliseconds between two ops/s reports.") var reportMs: Int32 = 1000
    @Option(name: .long, help: "How destinations may fetch: tcp, rdma (also offer one-sided RDMA READ of guest RAM; the listen address must be the RDMA device's) or auto (RDMA when possible).") var transport: String = "auto"
    @Option(name: .long, help: "Scheduling of the thread streaming background pages to a destination: normal, low (nice 10) or idle (SCHED_IDLE).") var backgroundPriority: String = "normal"
    @OptionGroup var key: KeyOptions
    @Flag(name: .long, help: "JSON Lines on stdout.") var json = false

    func validate() throws {
        try shape.validateShape()
        guard TransportKind(rawValue: transport) != nil else { throw ValidationError("--transport must be tcp, rdma or auto") }
        guard ThreadPriority(rawValue: backgroundPriority) != nil else { throw ValidationError("--background-priority must be normal, low or idle") }
        guard (0...100).contains(fillPercent) else { throw ValidationError("--fill-percent must be 0...100") }
        guard Endpoint(parsing: listen) != nil else { throw ValidationError("--listen must be HOST:PORT") }
    }

    func run() throws {
        var logger = Logger(label: "postcopy.guest")
        logger.logLevel = .warning
        let bytes = parseByteSize(shape.size)!
        let fd: Int32
        if let memory {
            fd = open(memory, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
            guard fd >= 0 else { throw fail("cannot create \(memory): \(SystemError("open", errno: errno))") }
        } else {
            fd = cpc_memfd_create("guest-ram", 1 /* MFD_CLOEXEC */)
            guard fd >= 0 else { throw fail("memfd_create: \(SystemError("memfd_create", errno: -fd))") }
        }
        defer { close(fd) }
        guard ftruncate(fd, off_t(bytes)) == 0 else { throw fail("cannot size guest memory: \(SystemError("ftruncate", errno: errno))") }
        let ram = try MemoryMapping.file(fd: fd, length: bytes, writable: true)
        let guest = try ReferenceGuest(base: ram.base, memoryBytes: bytes, workload: Workload(rawValue: shape.workload)!,
                                       vcpus: ReferenceGuest.freshVCPUs(shape.vcpus, seed: seed), trackDirty: false,
                                       zipfSkew: shape.zipfSkew)
        guest.populate(fillPercent: fillPercent, seed: seed)
        let memoryState = try SourceMemory(mapping: ram, pageSize: 4096)
        let authKey = try key.loadKey()
        let server: PageServer
        do {
            let rdma = try startRDMA(TransportKind(rawValue: transport)!, host: Endpoint(parsing: listen)!.host, memory: ram, logger: logger)
            server = try PageServer(memory: memoryState, listen: Endpoint(parsing: listen)!, exitAfterCompletion: false,
                                    backgroundPriority: ThreadPriority(rawValue: backgroundPriority)!, authKey: authKey,
                                    rdma: rdma, logger: logger)
        } catch { throw fail("\(error)") }
        server.start()
        if json {
            emitEvent(["event": "listening", "port": server.port, "memory_bytes": bytes])
        } else {
            print("guest running at the source, \(formatBytes(Double(bytes))), workload \(shape.workload); serving on port \(server.port); type \"pause\" to switch over")
        }
        guest.start()
        guest.release()
        let reporter = try OpsReporter(side: "source", json: json, intervalMs: reportMs) { guest.totalOps }
        if let pauseAfter {
            usleep(useconds_t(pauseAfter * 1e6))
        } else {
            while let line = readLine(), line.trimmingCharacters(in: .whitespaces) != "pause" {}
        }
        let pausedAt = nowNanoseconds()
        let state = guest.pause(pausedAt: pausedAt)
        let cpuAtPause = processCPUNanoseconds()  // from here on, the process only serves RAM
        memoryState.freeze(deviceState: state.encoded())
        let frozenAt = nowNanoseconds()
        reporter.finish()
        if json {
            emitEvent(["event": "paused", "paused_at_ns": pausedAt, "stop_ns": frozenAt - pausedAt, "ops": guest.totalOps])
        } else {
            print("paused: vCPUs stopped and device state published in \(formatDuration(ns: frozenAt - pausedAt)); serving RAM")
        }
        server.waitUntilCompletedAndIdle()
        server.stop()
        let s = server.stats
        let report: [String: Any] = [
            "event": "source_done", "demand_pages": s.demandPages.load(ordering: .relaxed),
            "background_pages": s.backgroundPages.load(ordering: .relaxed), "pages_sent_twice": s.pagesSentTwice.load(ordering: .relaxed),
            "bytes_sent": s.bytesSent.load(ordering: .relaxed), "cpu_seconds": Double(processCPUNanoseconds() - cpuAtPause) / 1e9,
        ]
        if json { emitEvent(report) } else { print("source done: \(report)") }
    }
}

struct GuestResumeCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "resume",
        abstract: "Resume the guest at the destination over empty memory handed to a page-fault daemon.",
        discussion: """
            Plays a Firecracker-style VMM: maps fresh guest RAM, creates a userfaultfd (with \
            UFFD_FEATURE_EVENT_REMOVE), registers the RAM, hands both to the daemon at --handoff, then \
            waits for the source guest's device state and resumes the vCPUs at once: every page they \
            touch is faulted in by the daemon. After --run-for seconds it stops and checks integrity: \
            every key-value checksum, and every page it did not write against the source's page digests.
            """)

    @Option(name: .long, help: "The daemon's handoff socket (not needed with --stop-and-copy).") var handoff: String?
    @Flag(name: .long, help: "Baseline: copy all RAM while paused, then resume (no userfaultfd, no daemon).") var stopAndCopy = false
    @Option(name: .long, help: "Source address, HOST:PORT (device state and page digests).") var source: String
    @Option(name: .long, help: "Seconds to run at the destination before checking integrity.") var runFor: Double = 5
    @Option(name: .long, help: "Milliseconds between two ops/s reports.") var reportMs: Int32 = 1000
    @Option(name: .long, help: "Run a task guest instead of the key-value workload: this many cooperative tasks per vCPU thread, each reading random words of random pages.") var tasks: Int = 0
    @Flag(name: .long, help: "Paravirtual async page faults for the task guest: RAM registered with UFFD_FEATURE_SIGBUS, a touched missing page parks the task (\"page not present\") and the vCPU runs another one until \"page ready\".") var apf = false
    @Option(name: .long, help: "Arithmetic iterations per read in the task guest (compute between memory touches).") var think: UInt32 = 100
    @Option(name: .long, help: "Milliseconds after resuming at which the task guest's work is counted (the same interval for every run).") var workWindowMs: Int = 1000
    @OptionGroup var key: KeyOptions
    @Flag(name: .long, help: "JSON Lines on stdout.") var json = false

    func validate() throws {
        guard Endpoint(parsing: source) != nil else { throw ValidationError("--source must be HOST:PORT") }
        guard (0...4096).contains(tasks) else { throw ValidationError("--tasks must be 0...4096") }
        guard !apf || (tasks > 0 && handoff != nil && !stopAndCopy) else { throw ValidationError("--apf needs --tasks N and --handoff") }
        guard workWindowMs > 0 else { throw ValidationError("--work-window-ms must be positive") }
        guard runFor > 0 else { throw ValidationError("--run-for must be positive") }
        guard stopAndCopy || handoff != nil else { throw ValidationError("--handoff is required unless --stop-and-copy") }
    }

    /// Stop-and-copy: every page over the main connection, in batches, into plain memory.
    func copyAll(_ transport: TCPTransport, _ table: RegionTable, into ram: MemoryMapping) throws -> UInt64 {
        let channel = try transport.openChannel(.background)
        let batch = 256, window = 4
        var next = 0, outstanding = 0, id: UInt64 = 1
        var copied: UInt64 = 0
        while next < table.totalPages || outstanding > 0 {
            while next < table.totalPages && outstanding < window {
                let n = min(batch, table.totalPages - next)
                try channel.submit(PageRequest(requestID: id, region: 0, pageClass: .background, pageOffset: UInt64(next), pageCount: UInt32(n)))
                id += 1
                next += n
                outstanding += 1
            }
            _ = cpc_poll1(channel.pollDescriptor, Int16(POLLIN), 1000)
            outstanding -= try channel.drainCompletions { (h, payload) throws(TransportError) in
                if !h.isZero {
                    (ram.base + Int(h.pageOffset) * table.pageSize).copyMemory(from: payload.baseAddress!, byteCount: payload.count)
                    copied += UInt64(payload.count)
                }
            }
        }
        return copied
    }

    /// The task guest (with or without async page faults): resume, count the
    /// work done in the first --work-window-ms and over --run-for, then bring every
    /// page in from inside tasks and check every page against the source's RAM.
    func runTaskGuest(ram: MemoryMapping, state: GuestDeviceState, receivedAt: UInt64, control: TCPTransport, info: SessionInfo,
                      channel: APFGuestChannel?) throws {
        let guest = TaskGuest(base: ram.base, bytes: ram.length, vcpus: state.vcpus.count, tasksPerVCPU: tasks, think: think,
                              seed: 7, channel: channel)
        let resumedAt = nowNanoseconds()
        guest.start()
        let downtime = resumedAt &- state.pausedAtNs
        if json {
            emitEvent(["event": "resumed", "resumed_at_ns": resumedAt, "downtime_ns": downtime,
                       "device_state_received_ns": receivedAt &- state.pausedAtNs, "restore_ns": resumedAt - receivedAt])
        } else {
            print("resumed (\(state.vcpus.count) vCPUs x \(tasks) tasks, \(apf ? "async page faults" : "blocking faults")): downtime \(formatDuration(ns: downtime))")
        }
        let reporter = try OpsReporter(side: "destination", json: json, intervalMs: reportMs) { guest.totalOps }
        let windowEnd = resumedAt + UInt64(workWindowMs) * 1_000_000
        let now0 = nowNanoseconds()
        if windowEnd > now0 { usleep(useconds_t((windowEnd - now0) / 1000)) }
        let windowOps = guest.totalOps
        let rest = Double(resumedAt) / 1e9 + runFor - Double(nowNanoseconds()) / 1e9
        if rest > 0 { usleep(useconds_t(rest * 1e6)) }
        guest.stop()
        reporter.finish()
        let ops = guest.totalOps
        let perTask = guest.perTask
        let v = guest.vcpuTotals
        guest.touchAll()
        // Integrity: the task guest only reads, so every page must equal the source's at pause.
        let digests: [UInt64]
        do { digests = try control.fetchAllPageDigests(info.table) } catch {
            throw fail("could not fetch the source's page digests: \(error)")
        }
        let pages = info.table.totalPages
        control.close()
        var mismatched = 0
        for p in 0..<pages where cpc_xxh64(ram.base + p * 4096, 4096, 0) != digests[p] { mismatched += 1 }
        let kv = try ReferenceGuest(base: ram.base, memoryBytes: ram.length, workload: state.workload, vcpus: state.vcpus,
                                    trackDirty: false, zipfSkew: state.zipfSkew).verifyStore()
        let stalls = perTask.map(\.stallNs).sorted()
        let ok = mismatched == 0 && kv.failed == 0
        let result: [String: Any] = [
            "event": "verified", "ok": ok, "kv_slots_verified": kv.verified, "kv_slots_failed": kv.failed,
            "get_checksum_failures": 0, "pages_verified": pages - mismatched, "pages_verified_before_first_write": 0,
            "pages_mismatched": mismatched, "ops": ops,
        ]
        let work: [String: Any] = [
            "event": "task_work", "apf": apf, "vcpus": state.vcpus.count, "tasks_per_vcpu": tasks, "think": Int(think),
            "work_window_ms": workWindowMs, "ops_in_window": windowOps, "ops": ops,
            "not_present": v.notPresent, "ready": v.ready, "notifications": v.notifications,
            "blocking_fallbacks": v.blockingFallbacks, "vcpu_idle_ns": v.idleNs,
            "task_stall_ns": ["p50": stalls[stalls.count / 2], "max": stalls.last ?? 0,
                              "mean": stalls.reduce(0, +) / UInt64(max(stalls.count, 1))],
            "task_stall_ns_each": stalls,
        ]
        if json {
            emitEvent(work)
            emitEvent(result)
        } else {
            print("work: \(windowOps) reads in the first \(workWindowMs) ms, \(ops) in all; \(v.notPresent) async faults, \(v.notifications) notifications")
            print("integrity: \(ok ? "OK" : "FAILED") \(result)")
        }
        if !ok { throw ExitCode(3) }
    }

    func run() throws {
        if let reason = Userfaultfd.unavailableReason() { throw fail(reason) }
        let control = TCPTransport(endpoint: Endpoint(parsing: source)!, maxBatchPages: 256, authKey: try key.loadKey())
        let info: SessionInfo
        do { info = try control.connect() } catch { throw fail("cannot reach the source: \(error)") }
        let bytes = info.table.totalPages * info.table.pageSize
        let ram = try MemoryMapping.anonymous(length: bytes)
        var uffd: Userfaultfd?
        var vmmSocket: OwnedFD?
        var apfChannel: APFGuestChannel?
        if let handoff, !stopAndCopy {
            // Guest RAM and its uffd, exactly as Firecracker sets them up.
            // With --apf, a touch of a missing page raises SIGBUS in the touching
            // thread instead of blocking it (the guest library turns it into an async fault).
            let u = try Userfaultfd(features: CPC_UFFD_FEATURE_EVENT_REMOVE | (apf ? CPC_UFFD_FEATURE_SIGBUS : 0))
            try u.registerMissing(ram.range)
            uffd = u
            let sock = cpc_unix_connect(handoff)
            guard sock >= 0 else { throw fail("cannot reach the daemon at \(handoff): \(SystemError("connect", errno: -sock))") }
            vmmSocket = OwnedFD(sock)
            let message = HandoffMessage.encode([VMMRegion(base: ram.address, size: UInt64(bytes), offset: 0, pageSize: 4096)])
            var uffdFD = u.fd.raw
            let sent = message.withUnsafeBytes { cpc_send_with_fds(sock, $0.baseAddress, $0.count, &uffdFD, 1) }
            guard sent == message.count else { throw fail("handoff sendmsg failed: \(SystemError("sendmsg", errno: sent < 0 ? Int32(-sent) : EIO))") }
            if apf {
                // The guest enables async page faults (like writing KVM's async-PF MSR).
                let ch = try APFGuestChannel()
                apfChannel = ch
                let fds = ch.fds
                let enable = APFEnable.json
                let n = enable.withUnsafeBytes { b in fds.withUnsafeBufferPointer { cpc_send_with_fds(sock, b.baseAddress, b.count, $0.baseAddress, 3) } }
                guard n == enable.count else { throw fail("sending the APF channel failed: \(SystemError("sendmsg", errno: n < 0 ? Int32(-n) : EIO))") }
            }
        }
        if json { emitEvent(["event": "ready", "memory_bytes": bytes]) } else { print("destination ready: waiting for the source to pause") }

        // Like QEMU's -incoming: everything is set up; only the device state is missing.
        let blob: [UInt8]
        do { blob = try control.fetchDeviceState(timeoutMs: 3_600_000) } catch { throw fail("no device state from the source: \(error)") }
        let receivedAt = nowNanoseconds()
        let state: GuestDeviceState
        do { state = try GuestDeviceState.decode(blob) } catch { throw fail("device state is not a reference guest's: \(error)") }
        guard state.memoryBytes == bytes else { throw fail("device state is for \(state.memoryBytes) bytes of RAM, the source serves \(bytes)") }
        if stopAndCopy {
            let c0 = nowNanoseconds()
            let copied: UInt64
            do { copied = try copyAll(control, info.table, into: ram) } catch { throw fail("stop-and-copy failed: \(error)") }
            if json { emitEvent(["event": "copied", "bytes": copied, "copy_ns": nowNanoseconds() - c0]) }
        }
        if tasks > 0 {
            try runTaskGuest(ram: ram, state: state, receivedAt: receivedAt, control: control, info: info, channel: apfChannel)
            _ = (uffd, vmmSocket)
            return
        }
        let guest = try ReferenceGuest(base: ram.base, memoryBytes: bytes, workload: state.workload, vcpus: state.vcpus, trackDirty: true,
                                       zipfSkew: state.zipfSkew)
        guest.start()
        let resumedAt = guest.release()
        let downtime = resumedAt &- state.pausedAtNs
        if json {
            emitEvent(["event": "resumed", "resumed_at_ns": resumedAt, "downtime_ns": downtime,
                       "device_state_received_ns": receivedAt &- state.pausedAtNs, "restore_ns": resumedAt - receivedAt])
        } else {
            print("resumed: downtime \(formatDuration(ns: downtime))")
        }
        // The source's page digests (ready once its RAM was scanned after the pause).
        let digests = Locked<[UInt64]?>(nil)
        let pages = info.table.totalPages
        let copyMode = stopAndCopy
        let table = info.table
        let fetcher = PThread(name: "digests") {
            guard let all = try? control.fetchAllPageDigests(table) else { return }
            digests.withLock { $0 = all }
            // Stop-and-copy has no daemon: this guest tells the source it has every page.
            if copyMode { _ = try? control.complete(Complete(pagesReceived: UInt64(pages), digest: nil)) }
        }
        let reporter = try OpsReporter(side: "destination", json: json, intervalMs: reportMs) { guest.totalOps }
        usleep(useconds_t(runFor * 1e6))
        _ = guest.pause(pausedAt: nowNanoseconds())
        reporter.finish()
        fetcher.join()
        control.close()
        let store = guest.verifyStore()
        guard let sourceDigests = digests.withLock({ $0 }) else { throw fail("could not fetch the source's page digests") }
        let pagesCheck = guest.verifyPages(against: sourceDigests)
        let failures = guest.integrityFailures
        let ok = store.failed == 0 && pagesCheck.mismatched == 0 && failures == 0
        let result: [String: Any] = [
            "event": "verified", "ok": ok, "kv_slots_verified": store.verified, "kv_slots_failed": store.failed,
            "get_checksum_failures": failures, "pages_verified": pagesCheck.verified,
            "pages_verified_before_first_write": pagesCheck.verifiedBeforeWrite, "pages_mismatched": pagesCheck.mismatched,
            "ops": guest.totalOps,
        ]
        if json { emitEvent(result) } else { print("integrity: \(ok ? "OK" : "FAILED") \(result)") }
        vmmSocket?.close()  // the VMM goes away: the daemon releases its session
        withExtendedLifetime((ram, uffd)) {}
        if !ok { throw ExitCode(3) }
    }
}
