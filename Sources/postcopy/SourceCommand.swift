import ArgumentParser
import Foundation
import PostcopyCore
import PostcopySource
import PostcopyMetrics
import PostcopyTransport

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
    var listen = Endpoint(host: "127.0.0.1", port: 7070)

    @Option(name: .long, help: "Serve Prometheus metrics at http://HOST:PORT/metrics (pages served by class, bytes on the wire, sessions, reconnects, connections refused, gathers). Port 0: any (printed).")
    var metricsListen: Endpoint?

    @Option(name: .long, help: "Device-state blob to hand to the destination (optional).")
    var deviceState: String?

    @Flag(name: .long, help: "Keep serving new sessions after one completes.")
    var serveForever = false

    @OptionGroup var common: CommonOptions

    func run() throws {
        let logger = common.makeLogger("postcopy.source")
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
        var metrics: MetricsEndpoint?
        if let m = metricsListen {
            do { metrics = try MetricsEndpoint.startBlocking(host: m.host, port: m.port, logger: logger) } catch {
                throw fail("--metrics-listen \(m): \(error)")
            }
        }
        defer { metrics?.stop() }
        let rdma = try Transports.listenRDMA(common.transport, host: listen.host, memory: mem.mapping, file: file.fd.raw, logger: logger)
        let server: PageServer
        do {
            server = try PageServer(memory: mem, listen: listen, exitAfterCompletion: !serveForever,
                                  backgroundPriority: common.backgroundPriority,
                                  authKey: key, encryption: try common.streamEncryption(), rdma: rdma, logger: logger)
        } catch {
            throw fail("\(error)")
        }
        let scanSeconds = Double(nowNanoseconds() - t0) / 1e9
        let scan = mem.waitForScan()!  // the file source is frozen and scanned at start
        let rss = ResidentMemorySampler(excluding: [mem.mapping.range])
        let collector = metrics.map { _ in SourceMetricsCollector(server.stats) }
        defer { collector?.finish() }
        server.start()
        // What serving costs, apart from start-up (mapping, scan, RDMA registration).
        let serveCPU0 = processCPUNanoseconds()
        // Scripts wait for this line before starting the destination (with --json,
        // it is the first JSON line; the report follows as the second).
        let banner: String
        if common.json {
            let metricsPort = metrics.map { ",\"metrics_port\":\($0.port)" } ?? ""
            banner = "{\"event\":\"listening\",\"port\":\(server.port),\"memory_bytes\":\(mem.mapping.length),\"zero_pages\":\(scan.zeros.count),\"digest\":\"\(MemoryDigest.hex(scan.digest))\"\(metricsPort)}\n"
        } else {
            banner = "listening on port \(server.port) (\(formatBytes(Double(mem.mapping.length))), \(scan.zeros.count) zero pages, digest \(MemoryDigest.hex(scan.digest)))\n"
        }
        FileHandle.standardOutput.write(banner.data(using: .utf8)!)
        server.waitUntilDone()
        server.stop()
        let s = server.stats
        let report = SourceReport(
            memoryBytes: mem.mapping.length, pageSize: mem.table.pageSize, zeroPages: scan.zeros.count,
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
