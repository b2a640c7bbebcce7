import CPostcopy
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// Resident memory of this process outside given address ranges (the guest-RAM
/// mappings), read from /proc/self/smaps. This is the daemon's own footprint.
public enum ResidentMemory {
    public static func bytesOutside(_ excluded: [Range<UInt64>]) -> Int {
        guard let f = fopen("/proc/self/smaps", "r") else { return -1 }
        defer { fclose(f) }
        var total = 0
        var skip = false
        var line = [CChar](repeating: 0, count: 512)
        while fgets(&line, Int32(line.count), f) != nil {
            let s = String(decoding: line.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
            if let dash = s.firstIndex(of: "-"), let sp = s.firstIndex(of: " "), dash < sp,
               let lo = UInt64(s[s.startIndex..<dash], radix: 16),
               let hi = UInt64(s[s.index(after: dash)..<sp], radix: 16) {
                skip = excluded.contains { $0.overlaps(lo..<hi) }
            } else if s.hasPrefix("Rss:"), !skip {
                let digits = s.dropFirst(4).filter { $0.isNumber }
                total += (Int(String(digits)) ?? 0) * 1024
            }
        }
        return total
    }
}

/// Samples `ResidentMemory.bytesOutside` on a thread and keeps the maximum.
public final class ResidentMemorySampler: Sendable {
    private final class Shared: Sendable {
        let maxBytes = Atomic<Int>(0)
        let stop: EventFD?
        init() { stop = try? EventFD() }
    }
    private let shared = Shared()
    private let thread: PThread

    /// Walking smaps costs about a millisecond per GiB mapped, so sample seldom.
    public init(excluding: [Range<UInt64>], intervalMs: Int = 500) {
        let shared = self.shared
        thread = PThread(name: "rss-sampler", priority: .idle) {
            var wait = intervalMs
            repeat {
                let t0 = nowNanoseconds()
                let v = ResidentMemory.bytesOutside(excluding)
                if v > shared.maxBytes.load(ordering: .relaxed) { shared.maxBytes.store(v, ordering: .relaxed) }
                // Never more than 2% of a CPU: where a walk is slow (a big pinned
                // mapping, an emulated CPU) sample less often.
                wait = max(intervalMs, Int((nowNanoseconds() - t0) / 1_000_000) * 50)
            } while cpc_poll1(shared.stop?.fd.raw ?? -1, 1, Int32(wait)) == 0
        }
    }

    /// Stops sampling (one last sample) and returns the maximum seen. May be called again.
    public func finish(excluding: [Range<UInt64>]) -> Int {
        shared.stop?.signal()
        thread.join()
        return max(shared.maxBytes.load(ordering: .relaxed), ResidentMemory.bytesOutside(excluding))
    }
}
