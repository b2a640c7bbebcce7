import ArgumentParser
import CPostcopy
import Foundation
import Histogram
import PostcopyCore
import PostcopyTransport

struct BaselineCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "baseline",
        abstract: "Measure a baseline in this process: tcp-rtt (raw loopback 4 KiB round trip), uffd-fault (local userfaultfd fault service), tcp-stream (raw loopback TCP throughput), aes-gcm (the encrypted stream's cipher alone, one core: sealing and opening records of --write-size) or dirty-scan (dirty tracking by async write-protect: protecting guest RAM once, and one scan of the pages written since the last).",
        discussion: "Benchmarks report the project's latencies as ratios against these, measured in the same run.")

    @Argument(help: "tcp-rtt, uffd-fault, tcp-stream, aes-gcm or dirty-scan")
    var which: BaselineKind

    @Option(name: .long, help: "Number of samples (tcp-rtt, uffd-fault; dirty-scan: rounds, at most 500).")
    var samples: Int = 20_000

    @Option(name: .long, help: "tcp-stream: bytes per write and per receive (e.g. 4K, or the transport's batch, 512K); aes-gcm: bytes per record.")
    var writeSize: String = "512K"

    @Option(name: .long, help: "tcp-stream: bytes to stream; aes-gcm: bytes to seal and open; dirty-scan: guest RAM to track (shared memory, allocated first).")
    var bytes: String = "1G"

    @Option(name: .long, help: "tcp-stream: memory each end walks through (e.g. 1G: from allocated memory into allocated memory, as a migration moves guest RAM); 0: one buffer of a write at each end, hot in the cache.")
    var span: String = "0"

    @Option(name: .long, help: "dirty-scan: random pages written before each scan.")
    var written: Int = 1000

    @Flag(name: .long, help: "JSON output.")
    var json = false

    func validate() throws {
        guard (100...10_000_000).contains(samples) else { throw ValidationError("--samples must be 100...10000000") }
        guard let w = parseByteSize(writeSize), (1...(64 << 20)).contains(w) else { throw ValidationError("--write-size must be 1 byte to 64 MiB") }
        guard let b = parseByteSize(bytes), b >= w, b <= (64 << 30) else { throw ValidationError("--bytes must be at least --write-size and at most 64 GiB") }
        guard let sp = parseByteSize(span), sp <= (16 << 30) else { throw ValidationError("--span must be 0 to 16 GiB") }
    }

    func run() throws {
        if which == .tcpStream { return try stream() }
        if which == .aesGCM { return try cipher() }
        if which == .dirtyScan { return try dirtyScan() }
        var out = [UInt64](repeating: 0, count: samples)
        let n = out.withUnsafeMutableBufferPointer { p in
            which == .tcpRTT ? cpc_baseline_tcp_rtt(Int32(samples), p.baseAddress) : cpc_baseline_uffd_fault(Int32(samples), p.baseAddress)
        }
        guard n > 0 else { throw fail("\(which.rawValue) baseline failed: \(SystemError(which.rawValue, errno: -n))") }
        var h = LatencyHistogram.make()
        // The first 1% warms caches and the connection; it is not part of the result.
        for v in out[(Int(n) / 100)..<Int(n)] { _ = h.record(max(v, 1)) }
        let s = LatencySummary(h)
        if json {
            emitJSON(BaselineReport(baseline: which.rawValue, latency: s))
        } else {
            print("\(which.rawValue): p50 \(formatDuration(ns: s.p50Ns))  p99 \(formatDuration(ns: s.p99Ns))  max \(formatDuration(ns: s.maxNs))  (\(s.count) samples)")
        }
    }
}

extension BaselineCommand {
    /// Raw loopback TCP throughput at one write size, and the receiver's CPU per GiB.
    func stream() throws {
        let w = parseByteSize(writeSize)!, total = parseByteSize(bytes)!, sp = parseByteSize(span)!
        var ns: UInt64 = 0, cpu: UInt64 = 0
        let r = cpc_baseline_tcp_stream(w, total, sp, &ns, &cpu)
        guard r == 0, ns > 0 else { throw fail("tcp-stream baseline failed: \(SystemError("tcp-stream", errno: -r))") }
        let moved = total - total % w
        let gib = Double(moved) / Double(1 << 30)
        let report = StreamBaselineReport(baseline: which.rawValue, writeSize: w, span: sp == 0 ? w : max(sp - sp % w, w), bytes: moved, seconds: Double(ns) / 1e9,
                                          bytesPerSecond: Double(moved) / (Double(ns) / 1e9),
                                          receiverCPUSecondsPerGiB: Double(cpu) / 1e9 / gib)
        if json {
            emitJSON(report)
        } else {
            let from = sp == 0 ? "one hot buffer at each end" : "walking \(formatBytes(Double(report.span))) of memory at each end"
            print("tcp-stream: \(formatBytes(Double(moved))) in \(formatBytes(Double(w))) writes (\(from)): \(formatBytes(report.bytesPerSecond))/s, receiver CPU \(fixed(report.receiverCPUSecondsPerGiB, 3)) s/GiB")
        }
    }
}

extension BaselineCommand {
    /// The stream's AES-256-GCM alone: seal and open rates, and CPU per GiB.
    func cipher() throws {
        let w = parseByteSize(writeSize)!, total = parseByteSize(bytes)!
        let r: (sealSeconds: Double, openSeconds: Double)
        do { r = try CipherBaseline.measure(recordBytes: w, total: total) } catch { throw fail("aes-gcm baseline failed: \(error)") }
        let moved = Double(max(total / w, 1) * w), gib = moved / Double(1 << 30)
        let report: [String: Any] = ["baseline": which.rawValue, "library": StreamKeys.library, "record_bytes": w, "bytes": Int(moved),
                                     "seal_bytes_per_second": moved / r.sealSeconds, "open_bytes_per_second": moved / r.openSeconds,
                                     "seal_seconds_per_gib": r.sealSeconds / gib, "open_seconds_per_gib": r.openSeconds / gib]
        if json {
            emitEvent(report)
        } else {
            print("aes-gcm (\(StreamKeys.library), \(formatBytes(Double(w))) records, one core): seal \(fixed(moved / r.sealSeconds / 1e9, 2)) GB/s, open \(fixed(moved / r.openSeconds / 1e9, 2)) GB/s (\(fixed(r.sealSeconds / gib, 3)) and \(fixed(r.openSeconds / gib, 3)) s per GiB)")
        }
    }
}

struct StreamBaselineReport: Codable {
    var baseline: String
    var writeSize: Int
    /// Bytes of memory each end walks through (the write size: one hot buffer).
    var span: Int
    var bytes: Int
    var seconds: Double
    var bytesPerSecond: Double
    var receiverCPUSecondsPerGiB: Double
    enum CodingKeys: String, CodingKey {
        case baseline, writeSize = "write_size", span, bytes, seconds, bytesPerSecond = "bytes_per_second"
        case receiverCPUSecondsPerGiB = "receiver_cpu_seconds_per_gib"
    }
}

struct BaselineReport: Codable {
    var baseline: String
    var latency: LatencySummary
}

/// `baseline tcp-rtt|uffd-fault|tcp-stream|dirty-scan`.
enum BaselineKind: String, CaseIterable, ExpressibleByArgument {
    case tcpRTT = "tcp-rtt"
    case uffdFault = "uffd-fault"
    case tcpStream = "tcp-stream"
    case dirtyScan = "dirty-scan"
    case aesGCM = "aes-gcm"
}
