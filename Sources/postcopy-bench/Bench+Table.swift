import Foundation
import PostcopyCore

/// The run table printed without --json: one row per migration.
extension PostcopyBench {
    func printTable(_ runs: [[String: Any]], a: Int, b: Int, machine: [String: Any]) {
        let us: (Any?) -> String = { v in (v as? Int).map { fixed(Double($0) / 1000, 1) + " µs" } ?? "-" }
        print("postcopy-bench: kernel \(machine["kernel"] ?? "?"), \(machine["cores"] ?? "?") cores; baselines p50: raw TCP 4 KiB round trip \(us(a)), local uffd fault \(us(b))")
        let header = ["transport", "size", "workload", "mode", "install", "downtime", "vs s&c", "full copy", "fault p50", "p50/(tcp+uffd)", "p99", "p99.9", "max", "stall", "ops/s before", "during", "after", "demand", "bg", "zero", "B/page", "src CPU", "dst CPU", "dst CPU/GiB", "dst RSS"]
        var rows: [[String]] = [header]
        for r in runs {
            let c = r["config"] as? [String: Any] ?? [:]
            let l = r["fault_latency"] as? [String: Any] ?? [:]
            let mean: (String) -> String = { k in
                let v = r[k] as? [Int] ?? []
                return v.isEmpty ? "-" : fixed(Double(v.reduce(0, +) / v.count) / 1e6, 2) + "M"
            }
            let ok = r["ok"] as? Bool == true
            rows.append([
                "\(c["transport"] ?? "")", "\(c["size"] ?? "")", "\(c["workload"] ?? "")", "\(c["mode"] ?? "")" + (ok ? "" : " FAILED"), "\(c["install"] ?? "")",
                (r["downtime_ns"] as? Int).map { formatDuration(ns: UInt64(max($0, 0))) } ?? "-",
                (r["downtime_over_stop_and_copy"] as? Double).map { fixed($0, 3) + "x" } ?? "-",
                (r["time_to_full_copy_seconds"] as? Double).map { fixed($0, 3) + " s" } ?? "-",
                us(l["p50_ns"]), (r["fault_p50_over_tcp_rtt_plus_uffd_fault"] as? Double).map { fixed($0, 2) } ?? "-",
                us(l["p99_ns"]), us(l["p999_ns"]), us(l["max_ns"]),
                ["postcopy", "hybrid"].contains(c["mode"] as? String ?? "") ? (r["stall_seconds"] as? Double).map { fixed($0, 3) + " s" } ?? "-" : "-",
                mean("ops_per_s_before"), mean("ops_per_s_during"), mean("ops_per_s_after"),
                "\(r["demand_pages"] ?? "-")", "\(r["background_pages"] ?? "-")", "\(r["zero_pages"] ?? "-")",
                (r["bytes_per_guest_page"] as? Double).map { fixed($0, 0) } ?? "-",
                (r["source_cpu_seconds"] as? Double).map { fixed($0, 2) + " s" } ?? "-",
                (r["daemon_cpu_seconds"] as? Double).map { fixed($0, 2) + " s" } ?? "-",
                (r["daemon_cpu_seconds_per_gib"] as? Double).map { fixed($0, 3) + " s" } ?? "-",
                (r["daemon_rss_outside_guest_max_bytes"] as? Int).flatMap { $0 > 0 ? formatBytes(Double($0)) : nil } ?? "-",
            ])
        }
        let widths = header.indices.map { i in rows.map { $0[i].count }.max() ?? 0 }
        for row in rows {
            print(row.enumerated().map { $0.element.padding(toLength: widths[$0.offset], withPad: " ", startingAt: 0) }.joined(separator: "  "))
        }
    }
}
