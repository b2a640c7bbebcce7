import Foundation
import PostcopyCore

/// Prefetch off and adaptive side by side, same run (`--prefetch off,adaptive`).
extension PostcopyBench {
    /// Per transport, size, workload, mode and install path that ran with both
    /// settings: each setting's medians, ranges and every run's value of
    /// demand faults, distinct pages the guest touched until every page was in,
    /// their ratio, summed vCPU stall, fault latency p50 and p99 (every fault,
    /// waits on a prefetch in flight included), time to full copy and ops/s
    /// during postcopy; the pages prefetched and shown used; and adaptive's
    /// medians over off's.
    func prefetchSummary(_ runs: [[String: Any]]) -> [[String: Any]] {
        func cfg(_ r: [String: Any], _ k: String) -> String { "\((r["config"] as? [String: Any])?[k] ?? "")" }
        func median(_ v: [Double]) -> Double? { v.isEmpty ? nil : v.sorted()[v.count / 2] }
        let keys = ["transport", "size", "workload", "mode", "install"]
        var out: [[String: Any]] = []
        var seen = Set<String>()
        for r in runs where cfg(r, "prefetch") == "adaptive" && r["ok"] as? Bool == true {
            let key = keys.map { cfg(r, $0) }.joined(separator: " ")
            guard seen.insert(key).inserted else { continue }
            let same = runs.filter { run in keys.map { cfg(run, $0) }.joined(separator: " ") == key && run["ok"] as? Bool == true }
            let off = same.filter { cfg($0, "prefetch") == "off" }, on = same.filter { cfg($0, "prefetch") == "adaptive" }
            guard !off.isEmpty else { continue }
            let metrics: [(String, ([String: Any]) -> Double?)] = [
                ("demand_faults", { ($0["demand_pages"] as? Int).map(Double.init) }),
                ("pages_touched", { ($0["pages_touched_before_full_copy"] as? Int).flatMap { $0 >= 0 ? Double($0) : nil } }),
                ("demand_per_touched", { r in
                    guard let d = r["demand_pages"] as? Int, let t = r["pages_touched_before_full_copy"] as? Int, t > 0 else { return nil }
                    return Double(d) / Double(t)
                }),
                ("stall_seconds", { $0["stall_seconds"] as? Double }),
                ("fault_p50_us", { (($0["fault_latency"] as? [String: Any])?["p50_ns"] as? Int).map { Double($0) / 1000 } }),
                ("fault_p99_us", { (($0["fault_latency"] as? [String: Any])?["p99_ns"] as? Int).map { Double($0) / 1000 } }),
                ("demand_request_p50_us", { (($0["demand_request_latency"] as? [String: Any])?["p50_ns"] as? Int).map { Double($0) / 1000 } }),
                ("demand_request_p99_us", { (($0["demand_request_latency"] as? [String: Any])?["p99_ns"] as? Int).map { Double($0) / 1000 } }),
                ("full_copy_seconds", { $0["time_to_full_copy_seconds"] as? Double }),
                ("ops_per_s_during", { r in
                    let v = r["ops_per_s_during"] as? [Int] ?? []
                    return v.isEmpty ? nil : Double(v.reduce(0, +)) / Double(v.count)
                }),
                ("prefetch_pages", { ($0["prefetch_pages"] as? Int).map(Double.init) }),
                ("prefetch_hits", { ($0["prefetch_hits"] as? Int).map(Double.init) }),
            ]
            var s: [String: Any] = Dictionary(uniqueKeysWithValues: keys.map { ($0, cfg(r, $0)) })
            s["runs"] = ["off": off.count, "adaptive": on.count]
            var ratios: [String: Double] = [:]
            for (name, f) in metrics {
                let a = off.compactMap(f), b = on.compactMap(f)
                s[name] = ["off": ["median": median(a) as Any, "all": a], "adaptive": ["median": median(b) as Any, "all": b]]
                if let ma = median(a), let mb = median(b), ma > 0 { ratios[name] = Double(mb) / Double(ma) }
            }
            // Pooled over every fault of the runs (each run's CDF weighted by its
            // fault count): one p50/p99 per setting, steadier than a median of
            // per-run percentiles when a run has a few thousand faults.
            for (name, latency, at) in [("pooled_fault_p50_us", "fault_latency", 50.0), ("pooled_fault_p99_us", "fault_latency", 99.0),
                                        ("pooled_demand_request_p50_us", "demand_request_latency", 50.0),
                                        ("pooled_demand_request_p99_us", "demand_request_latency", 99.0)] {
                let a = Self.pooledPercentile(off, latency, at), b = Self.pooledPercentile(on, latency, at)
                s[name] = ["off": a as Any, "adaptive": b as Any]
                if let a, let b, a > 0 { ratios[name] = b / a }
            }
            s["adaptive_over_off"] = ratios
            let range: (String, String) -> String = { name, setting in
                let v = (((s[name] as? [String: Any])?[setting] as? [String: Any])?["all"] as? [Double] ?? []).sorted()
                guard let lo = v.first, let hi = v.last else { return "-" }
                let m = v[v.count / 2]
                let f: (Double) -> String = { $0 >= 100 ? fixed($0, 0) : $0 >= 1 ? fixed($0, 2) : fixed($0, 3) }
                return v.count == 1 ? f(m) : "\(f(m)) (\(f(lo))-\(f(hi)))"
            }
            let x: (String) -> String = { ratios[$0].map { fixed($0, 2) + "x" } ?? "-" }
            s["line"] = "prefetch \(key), medians (range) off vs adaptive over \(off.count)/\(on.count) runs: "
                + "demand faults \(range("demand_faults", "off")) vs \(range("demand_faults", "adaptive")) = \(x("demand_faults")); "
                + "per page touched before the full copy \(range("demand_per_touched", "off")) vs \(range("demand_per_touched", "adaptive")); "
                + "stall \(range("stall_seconds", "off")) vs \(range("stall_seconds", "adaptive")) s = \(x("stall_seconds")); "
                + "fault p50 \(x("fault_p50_us")), p99 \(x("fault_p99_us")) (faults answered by a demand request: p50 \(x("demand_request_p50_us")), p99 \(x("demand_request_p99_us"))); full copy \(range("full_copy_seconds", "off")) vs \(range("full_copy_seconds", "adaptive")) s = \(x("full_copy_seconds")); "
                + "pooled over every fault: p50 \(x("pooled_fault_p50_us")), p99 \(x("pooled_fault_p99_us")) (demand-requested p99 \(x("pooled_demand_request_p99_us"))); "
                + "ops/s during \(x("ops_per_s_during")); prefetched \(range("prefetch_pages", "adaptive")) pages, shown used \(range("prefetch_hits", "adaptive"))"
            out.append(s)
        }
        return out
    }

    /// The `at` percentile (µs) of the latencies `key` of every fault of
    /// `runs` together: each run's distribution, from its CDF points
    /// (`fault_latency_cdf`) or its summary's percentiles, interpolated
    /// linearly and weighted by its count; the pooled CDF is solved by bisection.
    static func pooledPercentile(_ runs: [[String: Any]], _ key: String, _ at: Double) -> Double? {
        var dists: [(count: Double, points: [(pct: Double, ns: Double)])] = []
        for r in runs {
            guard let l = r[key] as? [String: Any], let n = l["count"] as? Int, n > 0 else { continue }
            var pts: [(pct: Double, ns: Double)]
            if key == "fault_latency", let cdf = r["fault_latency_cdf"] as? [[Double]], cdf.count >= 2 {
                pts = cdf.compactMap { $0.count == 2 ? (pct: $0[0], ns: $0[1]) : nil }
            } else {
                pts = [(50, "p50_ns"), (90, "p90_ns"), (99, "p99_ns"), (99.9, "p999_ns"), (100, "max_ns")]
                    .compactMap { pct, k in (l[k] as? Int).map { (pct: pct, ns: Double($0)) } }
                if let first = pts.first { pts.insert((pct: 0, ns: 0.5 * first.ns), at: 0) }
            }
            guard pts.count >= 2 else { continue }
            dists.append((Double(n), pts.sorted { $0.pct < $1.pct }))
        }
        guard !dists.isEmpty else { return nil }
        // The fraction of a run's faults at or under `x` ns.
        func cdf(_ pts: [(pct: Double, ns: Double)], _ x: Double) -> Double {
            if x <= pts[0].ns { return pts[0].pct / 100 }
            for i in 1..<pts.count where x <= pts[i].ns {
                let (a, b) = (pts[i - 1], pts[i])
                return (b.ns > a.ns ? a.pct + (b.pct - a.pct) * (x - a.ns) / (b.ns - a.ns) : b.pct) / 100
            }
            return 1
        }
        let total = dists.reduce(0) { $0 + $1.count }
        func pooled(_ x: Double) -> Double { dists.reduce(0) { $0 + $1.count * cdf($1.points, x) } / total }
        var lo = 0.0, hi = dists.map { $0.points.last!.ns }.max()!
        for _ in 0..<60 {
            let mid = (lo + hi) / 2
            if pooled(mid) < at / 100 { lo = mid } else { hi = mid }
        }
        return hi / 1000
    }
}
