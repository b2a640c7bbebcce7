import Foundation
import PostcopyCore

/// Hybrid (precopy → postcopy) against pure postcopy, same run.
extension PostcopyBench {
    /// Per transport, size and workload, medians over the repeats (and every
    /// run's value): total migration time ("migrate" to every page in),
    /// downtime, demand faults and vCPU stall after the switch, the guest's
    /// speed in its first 100 ms at the destination against before, and what
    /// precopy did (passes, decision, final dirty set).
    func hybridSummary(_ runs: [[String: Any]]) -> [[String: Any]] {
        func cfg(_ r: [String: Any], _ k: String) -> String { "\((r["config"] as? [String: Any])?[k] ?? "")" }
        func median(_ v: [Double]) -> Double? { v.isEmpty ? nil : v.sorted()[v.count / 2] }
        func mean(_ v: [Int]) -> Double? { v.isEmpty ? nil : Double(v.reduce(0, +)) / Double(v.count) }
        var out: [[String: Any]] = []
        var seen = Set<String>()
        for r in runs where cfg(r, "mode") == "hybrid" && r["ok"] as? Bool == true {
            let key = [cfg(r, "transport"), cfg(r, "size"), cfg(r, "workload")].joined(separator: " ")
            guard seen.insert(key).inserted else { continue }
            let same = runs.filter { [cfg($0, "transport"), cfg($0, "size"), cfg($0, "workload")].joined(separator: " ") == key && $0["ok"] as? Bool == true }
            var s: [String: Any] = ["transport": cfg(r, "transport"), "size": cfg(r, "size"), "workload": cfg(r, "workload")]
            var parts: [String] = []
            for mode in ["postcopy", "hybrid"] {
                let mine = same.filter { cfg($0, "mode") == mode && (mode == "hybrid" || cfg($0, "install") == "continue") }
                guard !mine.isEmpty else { continue }
                let total = mine.compactMap { $0["total_migration_seconds"] as? Double }
                let down = mine.compactMap { ($0["downtime_ns"] as? Int).map { Double($0) / 1e6 } }
                let demand = mine.compactMap { ($0["demand_pages"] as? Int).map(Double.init) }
                let stall = mine.compactMap { $0["stall_seconds"] as? Double }
                // The guest's first 100 ms at the destination against its speed before the migration began.
                let speed = mine.compactMap { run -> Double? in
                    guard let b = mean(run["ops_per_s_before"] as? [Int] ?? []), b > 0, let first = run["ops_per_s_first_at_destination"] as? Int else { return nil }
                    return Double(first) / b
                }
                var e: [String: Any] = ["runs": mine.count, "total_migration_seconds_each": total, "downtime_ms_each": down,
                                        "demand_pages_each": demand, "stall_seconds_each": stall, "first_100ms_speed_over_before_each": speed]
                for (k, v) in [("total_migration_seconds", total), ("downtime_ms", down), ("demand_pages", demand), ("stall_seconds", stall),
                               ("first_100ms_speed_over_before", speed)] {
                    if let m = median(v) { e[k] = m }
                }
                if mode == "hybrid" {
                    e["decisions"] = mine.map { $0["pause_reason"] as? String ?? "" }
                    e["passes_each"] = mine.map { (($0["source_precopy"] as? [String: Any])?["passes"] as? [Int])?.count ?? 0 }
                    e["final_dirty_pages_each"] = mine.map { ($0["source_precopy"] as? [String: Any])?["final_dirty_pages"] as? Int ?? -1 }
                }
                s[mode] = e
                parts.append("\(mode): total \(median(total).map { fixed($0, 3) } ?? "-") s [\(total.map { fixed($0, 2) }.joined(separator: " "))], downtime \(median(down).map { fixed($0, 2) } ?? "-") ms, demand \(median(demand).map { "\(Int($0))" } ?? "-") pages, stall \(median(stall).map { fixed($0, 3) } ?? "-") s, first 100 ms at \(median(speed).map { fixed(100 * $0, 0) } ?? "-") % of before")
            }
            let h = s["hybrid"] as? [String: Any], p = s["postcopy"] as? [String: Any]
            if let ht = h?["total_migration_seconds"] as? Double, let pt = p?["total_migration_seconds"] as? Double, pt > 0 {
                s["hybrid_total_over_postcopy"] = ht / pt
                parts.append("hybrid total = \(fixed(ht / pt, 2))x postcopy")
            }
            if let hd = h?["demand_pages"] as? Double, let pd = p?["demand_pages"] as? Double, pd > 0 {
                s["hybrid_demand_over_postcopy"] = hd / pd
                parts.append("demand faults \(fixed(100 * hd / pd, 1)) % of postcopy's")
            }
            s["line"] = "hybrid vs postcopy, \(key), median of \(`repeat`) run(s): " + parts.joined(separator: "; ")
            out.append(s)
        }
        return out
    }
}
