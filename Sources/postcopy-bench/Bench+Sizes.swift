import Foundation
import PostcopyCore

/// The size series: how postcopy's costs grow with the guest's size, per
/// transport, workload and install path (medians over the repeats).
extension PostcopyBench {
    func sizeSummary(_ runs: [[String: Any]]) -> [[String: Any]] {
        func cfg(_ r: [String: Any], _ k: String) -> String { "\((r["config"] as? [String: Any])?[k] ?? "")" }
        func median(_ v: [Double]) -> Double? { v.isEmpty ? nil : v.sorted()[v.count / 2] }
        let post = runs.filter { cfg($0, "mode") == "postcopy" && $0["ok"] as? Bool == true }
        var out: [[String: Any]] = []
        var seen = Set<String>()
        for r in post {
            let key = [cfg(r, "transport"), cfg(r, "workload"), cfg(r, "install")]
            guard seen.insert(key.joined(separator: " ")).inserted else { continue }
            let mine = post.filter { [cfg($0, "transport"), cfg($0, "workload"), cfg($0, "install")] == key }
            var bySize: [(gib: Double, entry: [String: Any])] = []
            for size in Set(mine.map { cfg($0, "size") }) {
                let same = mine.filter { cfg($0, "size") == size }
                guard let bytes = (same[0]["config"] as? [String: Any])?["memory_bytes"] as? Int else { continue }
                let gib = Double(bytes) / Double(1 << 30)
                var e: [String: Any] = ["size": size, "gib": gib, "runs": same.count]
                if let d = median(same.compactMap { ($0["downtime_ns"] as? Int).map(Double.init) }) { e["downtime_ms"] = d / 1e6 }
                if let f = median(same.compactMap { $0["time_to_full_copy_seconds"] as? Double }) {
                    e["full_copy_seconds"] = f
                    e["full_copy_seconds_per_gib"] = f / gib
                }
                if let m = median(same.compactMap { ($0["daemon_rss_outside_guest_max_bytes"] as? Int).map(Double.init) }), m > 0 {
                    e["daemon_rss_outside_guest_max_mib"] = m / Double(1 << 20)
                }
                if let c = median(same.compactMap { $0["source_cpu_seconds"] as? Double }) {
                    e["source_cpu_seconds"] = c
                    e["source_cpu_seconds_per_gib"] = c / gib
                }
                if let c = median(same.compactMap { $0["daemon_cpu_seconds_per_gib"] as? Double }) { e["daemon_cpu_seconds_per_gib"] = c }
                bySize.append((gib, e))
            }
            guard bySize.count > 1 else { continue }
            bySize.sort { $0.gib < $1.gib }
            let first = bySize.first!.entry, last = bySize.last!.entry
            func growth(_ k: String) -> String {
                guard let a = first[k] as? Double, let b = last[k] as? Double, a > 0 else { return "-" }
                return fixed(b / a, 2) + "x"
            }
            let rows = bySize.map { s -> String in
                let e = s.entry
                let f: (String, Int) -> String = { k, d in (e[k] as? Double).map { fixed($0, d) } ?? "-" }
                return "\(e["size"] ?? "?"): downtime \(f("downtime_ms", 2)) ms, full copy \(f("full_copy_seconds", 2)) s (\(f("full_copy_seconds_per_gib", 3)) s/GiB), daemon memory outside guest RAM \(f("daemon_rss_outside_guest_max_mib", 1)) MiB, source CPU \(f("source_cpu_seconds", 2)) s (\(f("source_cpu_seconds_per_gib", 3)) s/GiB)"
            }
            let line = "size series \(key[0]) \(key[1]) \(key[2]) (medians of \(bySize.map { "\($0.entry["runs"] ?? 0)" }.joined(separator: "/")) runs): " + rows.joined(separator: "; ")
                + "; from \(first["size"] ?? "?") to \(last["size"] ?? "?") (\(fixed(bySize.last!.gib / bySize.first!.gib, 0))x the RAM): downtime \(growth("downtime_ms")), full copy per GiB \(growth("full_copy_seconds_per_gib")), daemon memory \(growth("daemon_rss_outside_guest_max_mib")), source CPU per GiB \(growth("source_cpu_seconds_per_gib"))"
            out.append(["transport": key[0], "workload": key[1], "install": key[2], "sizes": bySize.map(\.entry), "line": line])
        }
        return out
    }

    /// Each series' costs at each size over the same at the smallest size: a
    /// flat line at 1 is a cost that does not grow with RAM (downtime, memory)
    /// or grows in proportion to it (the per-GiB costs).
    func writeSizePlot(_ summary: [[String: Any]], to dir: String) throws {
        var series: [LineChart.Series] = []
        let metrics = [("downtime_ms", "downtime"), ("full_copy_seconds_per_gib", "full copy per GiB"),
                       ("daemon_rss_outside_guest_max_mib", "daemon memory outside guest RAM"), ("source_cpu_seconds_per_gib", "source CPU per GiB")]
        for s in summary {
            let sizes = s["sizes"] as? [[String: Any]] ?? []
            for (k, name) in metrics {
                guard let base = sizes.first?[k] as? Double, base > 0 else { continue }
                series.append(.init(name: "\(name) (\(s["workload"] ?? "") \(s["install"] ?? ""))",
                                    points: sizes.compactMap { e in (e[k] as? Double).map { (e["gib"] as? Double ?? 0, $0 / base) } },
                                    dashed: k.hasSuffix("per_gib")))
            }
        }
        guard !series.isEmpty else { return }
        try LineChart(title: "Postcopy's costs against guest size (each over its value at the smallest size)", xLabel: "guest RAM (GiB)",
                      yLabel: "x the smallest size's", series: series).render().write(toFile: "\(dir)/size-series.svg", atomically: true, encoding: .utf8)
    }
}
