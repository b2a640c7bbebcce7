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
                + "ops/s during \(x("ops_per_s_during")); prefetched \(range("prefetch_pages", "adaptive")) pages, shown used \(range("prefetch_hits", "adaptive"))"
            out.append(s)
        }
        return out
    }
}
