import Foundation

/// What the reference guest's vCPUs do.
public enum Workload: String, Sendable, CaseIterable, Codable {
    /// A key-value store laid out in guest RAM: 90% GET, 10% SET over zipf-
    /// distributed keys (skew 0.99, YCSB's default); every value carries its own
    /// checksum, verified on every GET.
    case kv
    /// Sequential scan: each vCPU reads its share of pages in order, round and round.
    case scan
    /// Uniform random page reads (and writes: `writePercent`).
    case random
    /// Zipf-distributed page reads (skew 0.99): a hot set, like most real
    /// guests (and writes: `writePercent`).
    case zipf

    /// Percent of operations that write, unless told: the key-value store's
    /// 10 % SETs; the page workloads only read.
    public var defaultWritePercent: Int { self == .kv ? 10 : 0 }
}

/// One vCPU's architectural state: everything needed to continue exactly where it stopped.
public struct VCPUState: Sendable, Codable, Equatable {
    public var rng: UInt64
    public var cursor: Int
    public var ops: UInt64
}

/// The device state a paused guest hands over (vCPUs, workload, counters).
public struct GuestDeviceState: Sendable, Codable, Equatable {
    public var workload: Workload
    public var memoryBytes: Int
    public var vcpus: [VCPUState]
    /// CLOCK_MONOTONIC when the pause began (downtime is measured from here).
    public var pausedAtNs: UInt64
    public var integrityFailures: UInt64
    public var zipfSkew: Double = 0.99
    /// Percent of operations that write (kv: SETs; random, zipf: a byte of the page).
    public var writePercent: Int = 10

    public func encoded() -> [UInt8] { Array((try? JSONEncoder().encode(self)) ?? Data()) }
    public static func decode(_ bytes: [UInt8]) throws -> GuestDeviceState {
        try JSONDecoder().decode(GuestDeviceState.self, from: Data(bytes))
    }
}
