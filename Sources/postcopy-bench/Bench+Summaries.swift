import Foundation
import PostcopyCore

/// The summaries of a bench run: the install paths side by side, async page
/// faults against blocking ones.
extension PostcopyBench {
    /// The install paths side by side, per transport, size and workload
    /// (medians over the repeats): full copy against stop-and-copy, the
    /// stream against the raw TCP stream at the batch's write size, and the
    /// daemon's CPU per GiB received.
    /// " (0.58x raw TCP hot buffers, 0.78x raw TCP memory to memory)", or "".
    private func streamRatios(_ e: [String: Any]) -> String {
        let r = [("stream_over_raw_tcp_stream", "raw TCP hot buffers"), ("stream_over_raw_tcp_memory_stream", "raw TCP memory to memory")]
            .compactMap { k, name in (e[k] as? Double).map { "\(fixed($0, 2))x \(name)" } }
        return r.isEmpty ? "" : " (" + r.joined(separator: ", ") + ")"
    }

    func installSummary(_ runs: [[String: Any]], streams: [[String: Any]]) -> [[String: Any]] {
        func cfg(_ r: [String: Any], _ k: String) -> String { "\((r["config"] as? [String: Any])?[k] ?? "")" }
        func median(_ v: [Double]) -> Double? { v.isEmpty ? nil : v.sorted()[v.count / 2] }
        // The hot-buffer stream at the batch's write size, and the one from memory into memory.
        let isMemory: ([String: Any]) -> Bool = { ($0["span"] as? Int ?? 0) > ($0["write_size"] as? Int ?? 0) }
        let batchStream = streams.filter { !isMemory($0) }.max { ($0["write_size"] as? Int ?? 0) < ($1["write_size"] as? Int ?? 0) }
        // The median of each stream's rounds.
        let rawBps = median(streams.filter { !isMemory($0) && ($0["write_size"] as? Int) == (batchStream?["write_size"] as? Int) }
            .compactMap { $0["bytes_per_second"] as? Double })
        let memoryBps = median(streams.filter(isMemory).compactMap { $0["bytes_per_second"] as? Double })
        var out: [[String: Any]] = []
        var seen = Set<String>()
        for r in runs where cfg(r, "mode") == "postcopy" && r["ok"] as? Bool == true {
            let key = [cfg(r, "transport"), cfg(r, "size"), cfg(r, "workload")].joined(separator: " ")
            guard seen.insert(key).inserted else { continue }
            let same = runs.filter { [cfg($0, "transport"), cfg($0, "size"), cfg($0, "workload")].joined(separator: " ") == key && $0["ok"] as? Bool == true }
            let sc = median(same.filter { cfg($0, "mode") == "stop-and-copy" }.compactMap { $0["time_to_full_copy_seconds"] as? Double })
            var s: [String: Any] = ["transport": cfg(r, "transport"), "size": cfg(r, "size"), "workload": cfg(r, "workload")]
            if let sc { s["stop_and_copy_seconds"] = sc }
            if let rawBps { s["raw_tcp_stream_bytes_per_second"] = rawBps; s["raw_tcp_stream_write_size"] = batchStream?["write_size"] ?? 0 }
            if let memoryBps { s["raw_tcp_memory_stream_bytes_per_second"] = memoryBps }
            var parts: [String] = []
            for inst in list(install) {
                let mine = same.filter { cfg($0, "mode") == "postcopy" && cfg($0, "install") == inst }
                guard !mine.isEmpty else { continue }
                let full = mine.compactMap { $0["time_to_full_copy_seconds"] as? Double }
                let cpu = mine.compactMap { $0["daemon_cpu_seconds_per_gib"] as? Double }
                let bps = mine.compactMap { $0["stream_bytes_per_second"] as? Double }
                let pre = mine.compactMap { $0["preallocation_seconds"] as? Double }
                var e: [String: Any] = ["runs": mine.count, "full_copy_seconds_each": full, "daemon_cpu_seconds_per_gib_each": cpu,
                                        "stream_bytes_per_second_each": bps, "preallocation_seconds_each": pre]
                let f = median(full), c = median(cpu), b = median(bps)
                if let f { e["full_copy_seconds"] = f }
                if let c { e["daemon_cpu_seconds_per_gib"] = c }
                if let b { e["stream_bytes_per_second"] = b }
                if let f, let sc, sc > 0 { e["full_copy_over_stop_and_copy"] = f / sc }
                if let b, let rawBps, rawBps > 0 { e["stream_over_raw_tcp_stream"] = b / rawBps }
                if let b, let memoryBps, memoryBps > 0 { e["stream_over_raw_tcp_memory_stream"] = b / memoryBps }
                s[inst] = e
                parts.append("\(inst): full copy \(f.map { fixed($0, 3) } ?? "-") s"
                             + ((e["full_copy_over_stop_and_copy"] as? Double).map { " (\(fixed($0, 2))x stop-and-copy)" } ?? "")
                             + ", stream \(b.map { fixed($0 / Double(1 << 30), 2) } ?? "-") GiB/s"
                             + streamRatios(e)
                             + ", daemon CPU \(c.map { fixed($0, 3) } ?? "-") s/GiB"
                             + (inst == "continue" ? ", preallocated in \(median(pre).map { fixed($0, 3) } ?? "-") s before the pause" : ""))
            }
            if let a = (s["continue"] as? [String: Any])?["daemon_cpu_seconds_per_gib"] as? Double,
               let b = (s["copy"] as? [String: Any])?["daemon_cpu_seconds_per_gib"] as? Double, b > 0 {
                s["continue_cpu_saving"] = 1 - a / b
                parts.append("continue uses \(fixed(100 * (1 - a / b), 0)) % less daemon CPU per GiB")
            }
            s["line"] = "install paths, \(key), median of \(`repeat`) run(s)" + (sc.map { ", stop-and-copy \(fixed($0, 3)) s" } ?? "") + ": " + parts.joined(separator: "; ")
            out.append(s)
        }
        return out
    }

    /// Async against blocking page faults, per transport and size: the median
    /// work (reads) of the task guest in the window after resuming, its reads
    /// per second while postcopy ran, and per-task stall of the async runs.
    func apfSummary(_ runs: [[String: Any]]) -> [[String: Any]] {
        func cfg(_ r: [String: Any], _ k: String) -> String { "\((r["config"] as? [String: Any])?[k] ?? "")" }
        func median(_ v: [Int]) -> Int? { v.isEmpty ? nil : v.sorted()[v.count / 2] }
        var out: [[String: Any]] = []
        var seen = Set<String>()
        for r in runs where cfg(r, "mode") == "postcopy-apf" && r["ok"] as? Bool == true {
            let key = [cfg(r, "transport"), cfg(r, "size"), cfg(r, "workload"), cfg(r, "install")].joined(separator: " ")
            guard seen.insert(key).inserted else { continue }
            let same = runs.filter { [cfg($0, "transport"), cfg($0, "size"), cfg($0, "workload"), cfg($0, "install")].joined(separator: " ") == key && $0["ok"] as? Bool == true }
            let work: (String) -> [Int] = { m in same.filter { cfg($0, "mode") == m }.compactMap { ($0["task_work"] as? [String: Any])?["ops_in_window"] as? Int } }
            let a = median(work("postcopy-apf")), b = median(work("postcopy-blocking"))
            let stalls = same.filter { cfg($0, "mode") == "postcopy-apf" }.compactMap { ($0["task_work"] as? [String: Any])?["task_stall_ns"] as? [String: Any] }
            var s: [String: Any] = ["transport": cfg(r, "transport"), "size": cfg(r, "size"), "workload": cfg(r, "workload"),
                                    "install": cfg(r, "install"), "runs": work("postcopy-apf").count, "apf_ops_in_window_each": work("postcopy-apf"),
                                    "blocking_ops_in_window_each": work("postcopy-blocking")]
            if let a { s["apf_ops_in_window"] = a }
            if let b { s["blocking_ops_in_window"] = b }
            if let a, let b, b > 0 { s["apf_over_blocking"] = Double(a) / Double(b) }
            // The reads per second while pages were missing (resume to full
            // copy, 100 ms samples): what async faults are for. The window above
            // also counts work after the full copy when the copy ends inside it.
            let rate: (String) -> [Int] = { m in
                same.filter { cfg($0, "mode") == m }.compactMap { r in
                    let v = r["ops_per_s_during"] as? [Int] ?? []
                    return v.isEmpty ? nil : v.reduce(0, +) / v.count
                }
            }
            s["apf_ops_per_s_during_postcopy_each"] = rate("postcopy-apf")
            s["blocking_ops_per_s_during_postcopy_each"] = rate("postcopy-blocking")
            if let ra = median(rate("postcopy-apf")), let rb = median(rate("postcopy-blocking")), rb > 0 {
                s["apf_ops_per_s_during_postcopy"] = ra
                s["blocking_ops_per_s_during_postcopy"] = rb
                s["apf_over_blocking_during_postcopy"] = Double(ra) / Double(rb)
            }
            if let p = median(stalls.compactMap({ $0["p50"] as? Int })) { s["apf_task_stall_p50_ms"] = Double(p) / 1e6 }
            if let m = stalls.compactMap({ $0["max"] as? Int }).max() { s["apf_task_stall_max_ms"] = Double(m) / 1e6 }
            out.append(s)
        }
        return out
    }
}
