import Histogram
import PostcopyCore
import PostcopySource

extension BaselineCommand {
    /// What dirty tracking costs (`WriteProtectTracker`): protecting `--bytes` of
    /// shared guest memory once, then rounds of `--written` random pages written
    /// and one `collect` timed, which must report exactly those pages.
    func dirtyScan() throws {
        let total = parseByteSize(bytes)!
        let pageSize = MemoryMapping.systemPageSize
        let pages = total / pageSize
        guard (1...pages).contains(written) else { throw fail("--written must be 1...\(pages) (the pages of --bytes)") }
        let memory = try MemoryMapping.sharedMemfd(length: total, name: "dirty-scan")
        try memory.guest.populateWrite()  // a guest's RAM exists before precopy starts
        let tracker: WriteProtectTracker
        do { tracker = try WriteProtectTracker(base: memory.guest.base, length: total, pageSize: pageSize) } catch {
            throw fail("dirty tracking unavailable: \(error)")
        }
        var h = LatencyHistogram.make()
        var rng = SplitMix64(seed: 1)
        let rounds = min(samples, Self.maxDirtyScanRounds)
        for _ in 0..<rounds {
            var touched = Set<Int>()
            while touched.count < written {
                let p = Int(rng.next() % UInt64(pages))
                (memory.guest.base + p * pageSize).storeBytes(of: rng.next(), as: UInt64.self)
                touched.insert(p)
            }
            let t0 = nowNanoseconds()
            let dirty = try tracker.collect()
            _ = h.record(max(nowNanoseconds() - t0, 1))
            guard dirty.count == touched.count, touched.allSatisfy({ dirty.contains($0) }) else {
                throw fail("dirty tracking reported \(dirty.count) pages for \(touched.count) written")
            }
        }
        let s = LatencySummary(h)
        let report = DirtyScanBaselineReport(baseline: which.rawValue, bytes: total, pagesWritten: written,
                                             protectSeconds: Double(tracker.protectNanoseconds) / 1e9, scan: s)
        if json {
            emitJSON(report)
        } else {
            print("dirty-scan: protecting \(formatBytes(Double(total))) took \(formatDuration(ns: tracker.protectNanoseconds)); a scan finding \(written) written pages: p50 \(formatDuration(ns: s.p50Ns))  p99 \(formatDuration(ns: s.p99Ns))  (\(s.count) rounds)")
        }
    }

    static let maxDirtyScanRounds = 500
}

struct DirtyScanBaselineReport: Codable {
    var baseline: String
    var bytes: Int
    var pagesWritten: Int
    var protectSeconds: Double
    var scan: LatencySummary
    enum CodingKeys: String, CodingKey {
        case baseline, bytes, pagesWritten = "pages_written", protectSeconds = "protect_seconds", scan
    }
}
