import ArgumentParser
import CPostcopy
import Foundation
import PostcopyCore
import PostcopyDestination
import PostcopyTransport
import PostcopyWire

struct DestCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "dest",
        abstract: "Receive a guest's RAM by postcopy: fault pages in on demand, stream the rest.",
        discussion: """
            Maps guest RAM, registers it with userfaultfd (MISSING mode; MISSING | MINOR with --install \
            continue) and, with --touch, runs \
            threads that read every page the way a guest would. Demand faults are fetched on their \
            own connection ahead of the background stream. At the end the RAM digest is compared with \
            the source's; a mismatch exits with status 3.
            """)

    @Option(name: .long, help: "Source address, HOST:PORT.")
    var connect: Endpoint

    @Option(name: .long, help: "Serve VMMs instead: listen on this Unix socket for Firecracker-style handoffs (regions JSON + userfaultfd).")
    var handoff: String?

    @Flag(name: .long, help: "With --handoff: exit once the first VMM's session has ended.")
    var once = false

    @Option(name: .long, help: "With --handoff: serve Prometheus metrics at http://HOST:PORT/metrics (sessions, pages by class, bytes on the wire, fault service and recovery times, reconnects, APF events, the daemon's memory outside guest RAM). Port 0: any (printed).")
    var metricsListen: Endpoint?

    @Option(name: .long, help: "How the built-in guest touches pages: random, sequential, shared (every thread every page, same order) or none.")
    var touch: TouchMode = .random

    @Option(name: .long, help: "Guest threads touching pages.")
    var threads: Int = 4

    @Option(name: .long, help: "Guest compute between two touches, in microseconds (a busy loop, like a running vCPU).")
    var thinkUs: Int = 0

    @Option(name: .long, help: """
        How pages reach guest RAM: copy (anonymous memory, UFFDIO_COPY allocates and fills each page) or \
        continue (guest RAM in a memfd; the daemon writes each page into its own alias of it, preallocated \
        before streaming starts, and maps it with UFFDIO_CONTINUE).
        """)
    var install: InstallMode = .copy

    @Option(name: .long, help: ArgumentHelp("With --install continue: which replies are received straight into the alias (all, background, off); the rest is received into a buffer and copied there. For measurements.", visibility: .hidden))
    var receiveInPlace: String = "all"

    @Option(name: .long, help: "Background streaming: on, or off (demand faults only; for latency measurements).")
    var background: BackgroundStreaming = .on

    @Option(name: .long, help: "Fetch ahead of the faults: adaptive (pages along each fault stream's trend go out with the demand request, the depth growing with hits and dropping to none on random faults; the background stream follows the trend, or the most-faulted block) or off (only the page faulted on; the stream restarts after the last fault).")
    var prefetch: PrefetchMode = .adaptive

    @Option(name: .long, help: "With --handoff: record each VMM's working set (the pages it faults on in the --record-seconds after its first fault, in order, with a digest of each) and write it to this file when its migration completes. The background stream holds off during that window, so the record is whole. For restoring the same memory snapshot many times: give the file to --replay-working-set next time.")
    var recordWorkingSet: String?

    @Option(name: .long, help: "With --record-working-set: the recording window after the first fault, in seconds; a VMM that says its recorded work is done ({\"notify\":{\"record_end\":1}} on the handoff socket, `guest resume --end-recording-after-work`) ends it sooner.")
    var recordSeconds: Double = 2

    @Option(name: .long, help: "With --handoff: fetch the pages of this working-set file first, in its order and in large batches, ahead of everything but demand faults. A file for other memory (another layout, or pages whose bytes differ from their recorded digests) is refused for that VMM, which migrates without it.")
    var replayWorkingSet: String?

    @Option(name: .long, help: "Pages per background request.")
    var batchPages: Int = 128

    @Option(name: .long, help: "Background requests in flight at most (default: 4 over TCP, 16 over RDMA).")
    var window: Int?

    @Option(name: .long, help: "Cap on the background stream, e.g. 200M (bytes per second); 0 = no cap.")
    var backgroundRate = ByteCount(argument: "0")!

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
        guard (1...1024).contains(threads) else { throw ValidationError("--threads must be 1...1024") }
        guard ["all", "background", "off"].contains(receiveInPlace) else { throw ValidationError("--receive-in-place must be all, background or off") }
        guard (1...Int(PostcopyWire.WireProtocol.maxPagesPerRequest)).contains(batchPages) else {
            throw ValidationError("--batch-pages must be 1...\(PostcopyWire.WireProtocol.maxPagesPerRequest)")
        }
        guard recoveryDeadline >= 0 else { throw ValidationError("--recovery-deadline must be 0 or more seconds") }
        guard stallTimeout >= 0 else { throw ValidationError("--stall-timeout must be 0 or more seconds") }
        guard (0...1_000_000).contains(thinkUs) else { throw ValidationError("--think-us must be 0...1000000") }
        guard (1...64).contains(window ?? 4) else { throw ValidationError("--window must be 1...64") }
        if recordWorkingSet != nil || replayWorkingSet != nil {
            guard handoff != nil else { throw ValidationError("--record-working-set and --replay-working-set need --handoff (they follow a VMM's faults)") }
        }
        guard recordSeconds > 0, recordSeconds <= 3600 else { throw ValidationError("--record-seconds must be in (0, 3600]") }
        if background == .off && touch == .none {
            throw ValidationError("--background off with --touch none would never finish: nothing would fetch the pages")
        }
    }

    func run() throws {
        let logger = common.makeLogger("postcopy.dest")
        if let handoff { return try runHandoff(handoff, logger: logger) }
        if let reason = Userfaultfd.unavailableReason(minorShmem: install == .continue) { throw fail(reason) }
        var options = DestinationOptions()
        options.touch = touch
        options.install = install
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
        let (transport, reason) = try Transports.connect(common.transport, to: connect, maxBatchPages: batchPages,
                                                         authKey: key, encryption: try common.streamEncryption(), logger: logger)
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
        c.background = background == .on
        c.prefetch = prefetch
        if recordWorkingSet != nil { c.recordWorkingSetSeconds = recordSeconds }
        c.batchPages = batchPages
        c.window = window
        c.backgroundRate = backgroundRate.bytes
        c.backgroundPriority = common.backgroundPriority
        c.recoveryDeadline = recoveryDeadline
        c.stallTimeout = stallTimeout
        c.receiveInPlace = receiveInPlace != "off"
        c.receiveDemandInPlace = receiveInPlace == "all"
        return c
    }
}
