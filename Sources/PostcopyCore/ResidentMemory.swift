import CPostcopy
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// Resident memory of this process outside given address ranges (the guest-RAM
/// mappings), read from /proc/self/smaps. This is the daemon's own footprint.
public enum ResidentMemory {
    /// `sharedFiles`: also leaves out every shared mapping of a file (a daemon's
    /// aliases of its VMMs' guest memory files: memfd, tmpfs, hugetlbfs), so
    /// that VMMs coming and going need no bookkeeping of their ranges.
    public static func bytesOutside(_ excluded: [Range<UInt64>], sharedFiles: Bool = false) -> Int {
        let w = walk(excluded)
        return sharedFiles ? w.outsideSharedFiles : w.outside
    }

    /// One walk of /proc/self/smaps: resident bytes outside `excluded`, and of
    /// those, the ones outside shared file mappings too (one moment, both).
    public static func walk(_ excluded: [Range<UInt64>]) -> (outside: Int, outsideSharedFiles: Int) {
        guard let f = fopen("/proc/self/smaps", "r") else { return (-1, -1) }
        defer { fclose(f) }
        var total = 0, unshared = 0
        var skip = false, shared = false
        var line = [CChar](repeating: 0, count: 512)
        while fgets(&line, Int32(line.count), f) != nil {
            let s = String(decoding: line.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
            if let dash = s.firstIndex(of: "-"), let sp = s.firstIndex(of: " "), dash < sp,
               let lo = UInt64(s[s.startIndex..<dash], radix: 16),
               let hi = UInt64(s[s.index(after: dash)..<sp], radix: 16) {
                skip = excluded.contains { $0.overlaps(lo..<hi) }
                shared = isSharedFileMapping(s)
            } else if s.hasPrefix("Rss:"), !skip {
                let digits = s.dropFirst(4).filter { $0.isNumber }
                let b = (Int(String(digits)) ?? 0) * 1024
                total += b
                if !shared { unshared += b }
            }
        }
        return (total, unshared)
    }

    /// A smaps header line of a shared mapping of a file: permissions ending
    /// in "s" and a path ("7f..-7f.. rw-s 00000000 00:01 1234   /memfd:guest (deleted)").
    static func isSharedFileMapping(_ header: Substring) -> Bool {
        let fields = header.split(separator: " ", maxSplits: 5, omittingEmptySubsequences: true)
        guard fields.count >= 6, fields[1].count == 4, fields[1].last == "s" else { return false }
        return fields[5].drop { $0 == " " }.first == "/"
    }
    static func isSharedFileMapping(_ header: String) -> Bool { isSharedFileMapping(header[...]) }
}

/// A thread at idle priority that calls `tick` every `intervalMs` (first at
/// once, or after one interval), and less often when a tick is slow, until
/// `stop` (or until `tick` returns false).
final class IdleTicker: Sendable {
    private let stopEvent: EventFD?
    private let thread = Locked<PThread?>(nil)

    init(name: String, intervalMs: Int, tickFirst: Bool, _ tick: @escaping @Sendable () -> Bool) {
        let stop = try? EventFD()
        stopEvent = stop
        thread.withLock {
            $0 = PThread(name: name, priority: .idle) {
                var wait = intervalMs
                if !tickFirst, cpc_poll1(stop?.fd.raw ?? -1, 1, Int32(wait)) != 0 { return }
                while true {
                    let t0 = nowNanoseconds()
                    guard tick() else { return }
                    // At most 2 % of a CPU: where a tick is slow (a walk of smaps
                    // costs about 1 ms per GiB mapped, more on an emulated CPU or
                    // beside a big pinned mapping), tick less often.
                    wait = max(intervalMs, Int((nowNanoseconds() - t0) / 1_000_000) * 50)
                    if cpc_poll1(stop?.fd.raw ?? -1, 1, Int32(wait)) != 0 { return }
                }
            }
        }
    }

    /// Ends the thread and waits for it. May be called again.
    func stop() {
        stopEvent?.signal()
        thread.withLock { $0?.join(); $0 = nil }
    }
}

/// The resident memory of this process outside guest memory (`bytesOutside`
/// with `sharedFiles`), sampled on a thread for as long as the process serves:
/// its level when sampling started (idle), the highest seen, and the highest
/// since a given time (one VMM's session).
public final class ResidentMemoryLog: Sendable {
    private let samples = Locked<[(at: UInt64, bytes: Int)]>([])
    private let ticker = Locked<IdleTicker?>(nil)
    public let idleBytes: Int
    /// Samples kept (at one every 0.5 s or more: hours).
    static let keep = 20_000

    private let onSample: (@Sendable (Int) -> Void)?

    /// `onSample`: told every sample (a metrics gauge).
    public init(intervalMs: Int = 500, onSample: (@Sendable (Int) -> Void)? = nil) {
        self.onSample = onSample
        idleBytes = ResidentMemory.bytesOutside([], sharedFiles: true)
        record(idleBytes)
        ticker.withLock {
            $0 = IdleTicker(name: "rss-log", intervalMs: intervalMs, tickFirst: false) { [weak self] in
                guard let self else { return false }
                _ = self.sample()
                return true
            }
        }
    }

    /// Takes a sample now; returns it.
    @discardableResult public func sample() -> Int {
        let b = ResidentMemory.bytesOutside([], sharedFiles: true)
        record(b)
        return b
    }

    private func record(_ b: Int) {
        onSample?(b)
        samples.withLock {
            $0.append((nowNanoseconds(), b))
            if $0.count > Self.keep { $0.removeFirst($0.count - Self.keep / 2) }
        }
    }

    /// The highest sample taken at or after `since` (CLOCK_MONOTONIC ns), a
    /// fresh one included.
    public func maxBytes(since: UInt64) -> Int {
        let now = sample()
        return samples.withLock { s in s.reversed().prefix { $0.at >= since }.map(\.bytes).max() ?? now }
    }

    public var peakBytes: Int { samples.withLock { $0.map(\.bytes).max() ?? 0 } }

    public func stop() {
        ticker.withLock { $0 }?.stop()
    }
}

/// Samples `ResidentMemory.bytesOutside` on a thread and keeps the maximum
/// (walking smaps costs about a millisecond per GiB mapped: seldom).
public final class ResidentMemorySampler: Sendable {
    private final class Peak: Sendable { let bytes = Atomic<Int>(0) }
    private let peak = Peak()
    private let ticker = Locked<IdleTicker?>(nil)

    public init(excluding: [Range<UInt64>], intervalMs: Int = 500) {
        let peak = self.peak
        ticker.withLock {
            $0 = IdleTicker(name: "rss-sampler", intervalMs: intervalMs, tickFirst: true) {
                let v = ResidentMemory.bytesOutside(excluding)
                if v > peak.bytes.load(ordering: .relaxed) { peak.bytes.store(v, ordering: .relaxed) }
                return true
            }
        }
    }

    /// Stops sampling (one last sample) and returns the maximum seen. May be called again.
    public func finish(excluding: [Range<UInt64>]) -> Int {
        ticker.withLock { $0 }?.stop()
        return max(peak.bytes.load(ordering: .relaxed), ResidentMemory.bytesOutside(excluding))
    }
}
