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

    /// The wire form: "PCGS", a version, then fixed-width little-endian
    /// fields and one 24-byte record per vCPU. Binary, not JSON: it is built
    /// and parsed inside the downtime, where Foundation's JSON coders cost
    /// 0.3-0.8 ms here (measured: the destination's restore step).
    public func encoded() -> [UInt8] {
        var out: [UInt8] = Array("PCGS".utf8)
        func put<T: FixedWidthInteger>(_ v: T) { withUnsafeBytes(of: v.littleEndian) { out.append(contentsOf: $0) } }
        put(Self.version)
        put(UInt8(Workload.allCases.firstIndex(of: workload)!))
        put(UInt64(memoryBytes))
        put(pausedAtNs)
        put(integrityFailures)
        put(zipfSkew.bitPattern)
        put(Int32(writePercent))
        put(UInt32(vcpus.count))
        for v in vcpus {
            put(v.rng)
            put(Int64(v.cursor))
            put(v.ops)
        }
        return out
    }

    static let version: UInt16 = 1
    /// More vCPUs than a device state may carry (the CLI allows 256).
    public static let maxVCPUs = 4096

    public struct DecodeError: Error, CustomStringConvertible {
        public let description: String
    }

    /// Parses `encoded()`'s form; anything else (truncated, trailing bytes, a
    /// foreign version, out-of-range fields) is refused with its reason.
    public static func decode(_ bytes: [UInt8]) throws(DecodeError) -> GuestDeviceState {
        var at = 0
        func take<T: FixedWidthInteger>(_: T.Type, _ what: String) throws(DecodeError) -> T {
            guard bytes.count - at >= MemoryLayout<T>.size else {
                throw DecodeError(description: "device state truncated at \(what) (\(bytes.count) bytes)")
            }
            var v: T = 0
            withUnsafeMutableBytes(of: &v) { d in bytes.withUnsafeBytes { d.copyMemory(from: UnsafeRawBufferPointer(rebasing: $0[at..<(at + MemoryLayout<T>.size)])) } }
            at += MemoryLayout<T>.size
            return T(littleEndian: v)
        }
        guard bytes.count >= 4, Array(bytes[0..<4]) == Array("PCGS".utf8) else { throw DecodeError(description: "not a reference guest's device state (no PCGS magic)") }
        at = 4
        let version = try take(UInt16.self, "version")
        guard version == Self.version else { throw DecodeError(description: "device state version \(version), this guest reads \(Self.version)") }
        let w = Int(try take(UInt8.self, "workload"))
        guard w < Workload.allCases.count else { throw DecodeError(description: "unknown workload \(w)") }
        let memoryBytes = try take(UInt64.self, "memory size")
        guard memoryBytes > 0, memoryBytes <= UInt64(Int.max) else { throw DecodeError(description: "memory size \(memoryBytes) out of range") }
        let pausedAt = try take(UInt64.self, "pause time")
        let failures = try take(UInt64.self, "failures")
        let skew = Double(bitPattern: try take(UInt64.self, "zipf skew"))
        guard skew.isFinite, skew >= 0 else { throw DecodeError(description: "zipf skew \(skew) out of range") }
        let writes = Int(try take(Int32.self, "write percent"))
        guard (0...100).contains(writes) else { throw DecodeError(description: "write percent \(writes) out of range") }
        let n = Int(try take(UInt32.self, "vCPU count"))
        guard (1...maxVCPUs).contains(n) else { throw DecodeError(description: "\(n) vCPUs (1...\(maxVCPUs) accepted)") }
        guard bytes.count - at == n * 24 else {
            throw DecodeError(description: "device state holds \(bytes.count - at) bytes of vCPU state, \(n) vCPUs need \(n * 24)")
        }
        var vcpus: [VCPUState] = []
        vcpus.reserveCapacity(n)
        for _ in 0..<n {
            let rng = try take(UInt64.self, "vCPU")
            let cursor = try take(Int64.self, "vCPU")
            let ops = try take(UInt64.self, "vCPU")
            guard cursor >= 0 else { throw DecodeError(description: "vCPU cursor \(cursor) out of range") }
            vcpus.append(VCPUState(rng: rng, cursor: Int(cursor), ops: ops))
        }
        return GuestDeviceState(workload: Workload.allCases[w], memoryBytes: Int(memoryBytes), vcpus: vcpus, pausedAtNs: pausedAt,
                                integrityFailures: failures, zipfSkew: skew, writePercent: writes)
    }
}
