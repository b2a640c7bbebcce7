import ArgumentParser
import CPostcopy
import Foundation
import Histogram
import PostcopyCore

struct BaselineCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "baseline",
        abstract: "Measure a baseline in this process: tcp-rtt (raw loopback 4 KiB round trip) or uffd-fault (local userfaultfd fault service).",
        discussion: "Benchmarks report the project's latencies as ratios against these, measured in the same run.")

    @Argument(help: "tcp-rtt or uffd-fault")
    var which: BaselineKind

    @Option(name: .long, help: "Number of samples.")
    var samples: Int = 20_000

    @Flag(name: .long, help: "JSON output.")
    var json = false

    func validate() throws {
        guard (100...10_000_000).contains(samples) else { throw ValidationError("--samples must be 100...10000000") }
    }

    func run() throws {
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

struct BaselineReport: Codable {
    var baseline: String
    var latency: LatencySummary
}

/// `baseline tcp-rtt|uffd-fault`.
enum BaselineKind: String, CaseIterable, ExpressibleByArgument {
    case tcpRTT = "tcp-rtt"
    case uffdFault = "uffd-fault"
}
