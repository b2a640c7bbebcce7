import CPostcopy

/// Monotonic nanoseconds.
@inline(__always)
public func nowNanoseconds() -> UInt64 { cpc_now_ns() }

/// CPU time (user + system, all threads) of this process, in nanoseconds.
public func processCPUNanoseconds() -> UInt64 { cpc_process_cpu_ns() }

/// Formats nanoseconds for people.
public func formatDuration(ns: UInt64) -> String {
    let v = Double(ns)
    if v < 1_000 { return "\(ns) ns" }
    if v < 1_000_000 { return "\(fixed(v / 1_000, 1)) µs" }
    if v < 1_000_000_000 { return "\(fixed(v / 1_000_000, 2)) ms" }
    return "\(fixed(v / 1_000_000_000, 3)) s"
}
