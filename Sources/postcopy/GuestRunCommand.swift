import ArgumentParser
import CPostcopy
import Foundation
import Logging
import PostcopyCore
import PostcopyGuest
import PostcopyMetrics
import PostcopySource
import PostcopyTransport

struct GuestRunCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "run",
        abstract: "Run the guest at the source and serve its RAM; pause on a \"pause\" line on stdin.",
        discussion: """
            Boots the guest (fills the key-value store), runs the workload, and serves its RAM to \
            destinations like `postcopy source` does. On a line "pause" on standard input the vCPUs \
            stop at a safe point, the device state is published, and the guest's RAM is frozen and \
            served until a destination completed and every connection closed.

            A line "migrate" (or --pause-after seconds) starts the migration: with --precopy off the \
            guest pauses at once (postcopy); otherwise its RAM is first copied to the destination \
            while it runs, in passes the destination asks for (pass 1: every page holding data; then \
            the pages written since, tracked by userfaultfd write-protect), and the guest pauses when \
            the policy says: after N passes, or (auto) when passes stop shrinking, the guest rewrites \
            what was just sent, or a budget is spent. The pages written after they were sent go to the \
            destination as the final dirty set, and postcopy does the rest.
            """)

    @OptionGroup var shape: GuestShape
    @Option(name: .long, help: "Percentage of key-value slots filled at boot (the rest of RAM stays zero).") var fillPercent: Int = 75
    @Option(name: .long, help: "After the pause, serve the frozen RAM until this many destinations completed (restores of one snapshot, e.g. `postcopy restore`), then exit.") var serveSessions: Int = 1
    @Option(name: .long, help: "Seed of the workload.") var seed: UInt64 = 1
    @Option(name: .long, help: "Listen address for destinations, HOST:PORT (port 0: any; printed first).") var listen = Endpoint(host: "127.0.0.1", port: 0)
    @Option(name: .long, help: "Guest memory file (default: an anonymous memfd).") var memory: String?
    @Option(name: .long, help: "Start the migration by itself after this many seconds, as a \"migrate\" line would (default: wait for \"migrate\" or \"pause\" on stdin).") var pauseAfter: Double?
    @Option(name: .long, help: "Precopy before the pause: off (postcopy only), N passes (1-64), or auto (stop when passes no longer shrink, the guest rewrites what was just sent, or 16 passes / 60 s / 4× RAM were spent).") var precopy: String = "off"
    @Option(name: .long, help: "With --precopy: on (hybrid: postcopy fetches what is still dirty after the pause) or off (pure precopy: the destination copies the rest while the guest stays paused, then resumes; writes outpacing the copy do not end pass 1).") var postcopy: Toggle = .on
    @Option(name: .long, help: "With --precopy: seconds to wait after \"migrate\" for a destination to ask for precopy before pausing anyway.") var precopyWait: Double = 5
    @Option(name: .long, help: "With --precopy: seconds the destination copying in precopy may stay away (its connection gone, not back) before precopy is cancelled: tracking stops, the guest keeps running, another destination may start over. Longer than the destination's --recovery-deadline.") var precopyAbandonAfter: Double = 90
    @Option(name: .long, help: "Milliseconds between two ops/s reports.") var reportMs: Int32 = 1000
    @Option(name: .long, help: "How destinations may fetch: tcp, rdma (also offer one-sided RDMA READ of guest RAM; the listen address must be the RDMA device's) or auto (RDMA when possible).") var transport: TransportKind = .auto
    @Option(name: .long, help: "Scheduling of the thread streaming background pages to a destination: normal, low (nice 10) or idle (SCHED_IDLE).") var backgroundPriority: ThreadPriority = .normal
    @Option(name: .long, help: "Serve the page server's Prometheus metrics at http://HOST:PORT/metrics (as source --metrics-listen; port 0: any, given as metrics_port in the listening line).")
    var metricsListen: Endpoint?
    @OptionGroup var io: GuestIOOptions
    var key: KeyOptions { io.key }
    var json: Bool { io.json }

    func validate() throws {
        guard (0...100).contains(fillPercent) else { throw ValidationError("--fill-percent must be 0...100") }
        guard (1...1000).contains(serveSessions) else { throw ValidationError("--serve-sessions must be 1...1000") }
        guard PrecopyPolicy.mode(parsing: precopy) != nil else { throw ValidationError("--precopy must be off, auto or a number of passes 1...64, not \(precopy)") }
        guard postcopy == .on || precopy != "off" else { throw ValidationError("--postcopy off needs --precopy N or auto (otherwise nothing is copied before the pause)") }
        guard precopyAbandonAfter > 0 else { throw ValidationError("--precopy-abandon-after must be positive") }
        guard precopyWait > 0 else { throw ValidationError("--precopy-wait must be positive") }
    }

    func run() throws {
        var logger = Logger(label: "postcopy.guest")
        logger.logLevel = .warning
        let bytes = shape.size.bytes
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
        let guest = try ReferenceGuest(base: ram.base, memoryBytes: bytes, workload: shape.workload,
                                       vcpus: ReferenceGuest.freshVCPUs(shape.vcpus, seed: seed), trackDirty: false,
                                       zipfSkew: shape.zipfSkew, writePercent: shape.effectiveWritePercent)
        guest.populate(fillPercent: fillPercent, seed: seed)
        let memoryState = try SourceMemory(mapping: ram, pageSize: guest.pageSize, file: fd)
        let authKey = try key.loadKey()
        // The pause comes from stdin ("pause"), or from precopy's decision. The
        // thread that asks first pauses the guest and publishes its device
        // state itself: waking another thread for it cost up to 1-2 ms of
        // downtime on a machine busy with precopy (measured: the source's stop
        // took 0.6-1.8 ms when auto stopped pass 1 of a random writer).
        let pauseEvent = try EventFD()
        let pauseReason = Locked<String?>(nil)
        let pausedAt = Locked<(paused: UInt64, frozen: UInt64, cpu: UInt64, ops: UInt64)?>(nil)
        let requestPause: @Sendable (String) -> Void = { why in
            let first = pauseReason.withLock { r -> Bool in
                guard r == nil else { return false }
                r = why
                return true
            }
            guard first else { return }
            let t = nowNanoseconds()
            let state = guest.pause(pausedAt: t)
            let cpu = processCPUNanoseconds()  // from here on, the process only serves RAM
            memoryState.freeze(deviceState: state.encoded())
            let frozen = nowNanoseconds()
            pausedAt.withLock { $0 = (t, frozen, cpu, guest.totalOps) }
            pauseEvent.signal()
        }
        var policy = PrecopyPolicy(mode: PrecopyPolicy.mode(parsing: precopy)!, totalPages: bytes / guest.pageSize)
        policy.postcopyAfter = postcopy == .on
        let controller = try PrecopyController(policy: policy,
                                               memory: memoryState, destinationWaitSeconds: precopyWait, abandonSeconds: precopyAbandonAfter,
                                               logger: logger, requestPause: requestPause)
        var metrics: MetricsEndpoint?
        if let m = metricsListen {
            do { metrics = try MetricsEndpoint.startBlocking(host: m.host, port: m.port, logger: logger) } catch {
                throw fail("--metrics-listen \(m): \(error)")
            }
        }
        defer { metrics?.stop() }
        let server: PageServer
        do {
            let rdma = try Transports.listenRDMA(transport, host: listen.host, memory: ram, logger: logger)
            server = try PageServer(memory: memoryState, listen: listen, exitAfterCompletion: false,
                                    backgroundPriority: backgroundPriority, authKey: authKey, encryption: try key.streamEncryption(),
                                    rdma: rdma, precopy: controller.offered ? controller : nil, logger: logger)
        } catch { throw fail("\(error)") }
        let collector = metrics.map { _ in SourceMetricsCollector(server.stats) }
        defer { collector?.finish() }
        server.start()
        if json {
            emitEvent(.listening(.init(port: server.port, memoryBytes: bytes, metricsPort: metrics?.port)))
        } else {
            print("guest running at the source, \(formatBytes(Double(bytes))), workload \(shape.workload.rawValue); serving on port \(server.port); type \"pause\" to switch over")
        }
        guest.start()
        guest.release()
        let reporter = try OpsReporter(side: "source", json: json, intervalMs: reportMs) { guest.totalOps }
        let json = self.json
        let mode = precopy
        let startMigration: @Sendable () -> Void = {
            if json {
                emitEvent(.migrating(.init(tNs: nowNanoseconds(), precopy: mode)))
            } else if mode != "off" {
                print("migrating: precopy (\(mode)) while the guest runs")
            }
            controller.begin()
        }
        _ = PThread(name: "stdin") {
            while let line = readLine() {
                switch line.trimmingCharacters(in: .whitespaces) {
                case "pause": requestPause("paused by the operator"); return
                case "migrate": startMigration()
                default: continue
                }
            }
            if pauseAfter == nil { requestPause("standard input closed") }
        }
        if let pauseAfter {
            _ = PThread(name: "pause-after") {
                usleep(useconds_t(pauseAfter * 1e6))
                startMigration()
            }
        }
        var pause: (paused: UInt64, frozen: UInt64, cpu: UInt64, ops: UInt64)?
        while pause == nil {
            _ = cpc_poll1(pauseEvent.fd.raw, Int16(POLLIN), 1000)
            pause = pausedAt.withLock { $0 }
        }
        let (paused, frozenAt, cpuAtPause, opsAtPause) = pause!
        reporter.finish()
        if json {
            emitEvent(.paused(.init(pausedAtNs: paused, stopNs: frozenAt - paused, ops: opsAtPause,
                                    reason: pauseReason.withLock { $0 })))
        } else {
            print("paused (\(pauseReason.withLock { $0 } ?? "")): vCPUs stopped and device state published in \(formatDuration(ns: frozenAt - paused)); serving RAM")
        }
        server.waitUntilCompletedAndIdle(sessions: serveSessions)
        server.stop()
        let s = server.stats
        let report = GuestEvent.sourceDone(.init(
            demandPages: s.demandPages.load(ordering: .relaxed), backgroundPages: s.backgroundPages.load(ordering: .relaxed),
            pagesSentTwice: s.pagesSentTwice.load(ordering: .relaxed), bytesSent: s.bytesSent.load(ordering: .relaxed),
            cpuSeconds: Double(processCPUNanoseconds() - cpuAtPause) / 1e9,
            precopy: controller.offered ? controller.report : nil))
        if json { emitEvent(report) } else { print("source done: \(report.line)") }
    }
}
