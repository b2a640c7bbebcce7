import Foundation
import PostcopyCore

/// The migration modes side by side, same run: pure postcopy, hybrid
/// (precopy → postcopy), pure precopy and stop-and-copy.
extension PostcopyBench {
    /// The modes compared, in the order they are reported.
    static let comparedModes = ["postcopy", "hybrid", "precopy", "stop-and-copy"]

    /// Per transport, size and workload with a hybrid or precopy run, medians
    /// over the repeats (and every run's value) for each mode that ran: total
    /// migration time ("migrate" to every page in), downtime, time to full
    /// copy after the pause, demand faults and vCPU stall after the switch,
    /// bytes received per guest page, the guest's speed before, during
    /// postcopy and after, its first 100 ms at the destination against
    /// before, and what precopy did (passes, decision, final dirty set).
    func hybridSummary(_ runs: [[String: Any]]) -> [[String: Any]] {
        func cfg(_ r: [String: Any], _ k: String) -> String { "\((r["config"] as? [String: Any])?[k] ?? "")" }
        func median(_ v: [Double]) -> Double? { v.isEmpty ? nil : v.sorted()[v.count / 2] }
        func mean(_ v: [Int]) -> Double? { v.isEmpty ? nil : Double(v.reduce(0, +)) / Double(v.count) }
        var out: [[String: Any]] = []
        var seen = Set<String>()
        for r in runs where ["hybrid", "precopy"].contains(cfg(r, "mode")) && r["ok"] as? Bool == true {
            let key = [cfg(r, "transport"), cfg(r, "size"), cfg(r, "workload")].joined(separator: " ")
            guard seen.insert(key).inserted else { continue }
            let same = runs.filter { [cfg($0, "transport"), cfg($0, "size"), cfg($0, "workload")].joined(separator: " ") == key && $0["ok"] as? Bool == true }
            var s: [String: Any] = ["transport": cfg(r, "transport"), "size": cfg(r, "size"), "workload": cfg(r, "workload")]
            var parts: [String] = []
            for mode in Self.comparedModes {
                let mine = same.filter { cfg($0, "mode") == mode && (mode != "postcopy" || cfg($0, "install") == "continue") }
                guard !mine.isEmpty else { continue }
                let total = mine.compactMap { $0["total_migration_seconds"] as? Double }
                let down = mine.compactMap { ($0["downtime_ns"] as? Int).map { Double($0) / 1e6 } }
                let demand = mine.compactMap { ($0["demand_pages"] as? Int).map(Double.init) }
                let stall = mine.compactMap { $0["stall_seconds"] as? Double }
                let full = mine.compactMap { $0["time_to_full_copy_seconds"] as? Double }
                let perPage = mine.compactMap { $0["bytes_per_guest_page"] as? Double }
                let ops: (String) -> [Double] = { k in mine.compactMap { mean($0[k] as? [Int] ?? []) } }
                // The guest's first 100 ms at the destination against its speed before the migration began.
                let speed = mine.compactMap { run -> Double? in
                    guard let b = mean(run["ops_per_s_before"] as? [Int] ?? []), b > 0, let first = run["ops_per_s_first_at_destination"] as? Int else { return nil }
                    return Double(first) / b
                }
                var e: [String: Any] = ["runs": mine.count, "total_migration_seconds_each": total, "downtime_ms_each": down,
                                        "demand_pages_each": demand, "stall_seconds_each": stall, "first_100ms_speed_over_before_each": speed,
                                        "time_to_full_copy_seconds_each": full, "bytes_per_guest_page_each": perPage,
                                        "integrity_ok_each": mine.map { ($0["integrity"] as? [String: Any])?["ok"] as? Bool ?? false }]
                let before = ops("ops_per_s_before"), precopying = ops("ops_per_s_precopy"), during = ops("ops_per_s_during"), after = ops("ops_per_s_after")
                for (k, v) in [("total_migration_seconds", total), ("downtime_ms", down), ("demand_pages", demand), ("stall_seconds", stall),
                               ("first_100ms_speed_over_before", speed), ("time_to_full_copy_seconds", full), ("bytes_per_guest_page", perPage),
                               ("ops_per_s_before", before), ("ops_per_s_precopy", precopying), ("ops_per_s_during", during), ("ops_per_s_after", after)] {
                    if let m = median(v) { e[k] = m }
                }
                if mode == "hybrid" || mode == "precopy" {
                    e["decisions"] = mine.map { $0["pause_reason"] as? String ?? "" }
                    e["passes_each"] = mine.map { (($0["source_precopy"] as? [String: Any])?["passes"] as? [Int])?.count ?? 0 }
                    e["final_dirty_pages_each"] = mine.map { ($0["source_precopy"] as? [String: Any])?["final_dirty_pages"] as? Int ?? -1 }
                }
                s[mode] = e
                let m: ([Double]) -> String = { v in median(v).map { fixed($0 / 1e6, 2) } ?? "-" }
                parts.append("\(mode): total \(median(total).map { fixed($0, 3) } ?? "-") s [\(total.map { fixed($0, 2) }.joined(separator: " "))], downtime \(median(down).map { fixed($0, 2) } ?? "-") ms, demand \(median(demand).map { "\(Int($0))" } ?? "-") pages, stall \(median(stall).map { fixed($0, 3) } ?? "-") s, \(median(perPage).map { fixed($0, 0) } ?? "-") B/page, M ops/s before \(m(before)) precopy \(m(precopying)) postcopy \(m(during)) after \(m(after)), first 100 ms at \(median(speed).map { fixed(100 * $0, 0) } ?? "-") % of before")
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
            s["line"] = "modes side by side (hybrid vs postcopy), \(key), median of \(`repeat`) run(s):\n  " + parts.joined(separator: "\n  ")
            out.append(s)
        }
        return out
    }
}
