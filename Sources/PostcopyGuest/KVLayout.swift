import CPostcopy
import PostcopyCore

/// Layout of the key-value store: one host page of header, then 256-byte slots:
/// key u64, version u64, checksum u64, length u32, pad u32, value.
public enum KVLayout {
    public static let slotSize = 256
    public static let valueCapacity = slotSize - 32
    /// The header (the magic, then nothing): one host page.
    public static let headerBytes = MemoryMapping.systemPageSize
    public static let magic: UInt64 = 0x4B56_5354_4F52_4531  // "KVSTORE1"

    public static func slotCount(memoryBytes: Int) -> Int { (memoryBytes - headerBytes) / slotSize }

    static func checksum(_ slot: UnsafeRawPointer, length: Int) -> UInt64 {
        // key and version, then the value: the checksum field itself is left out.
        var h = cpc_xxh64(slot, 16, 0x4B56)
        h = cpc_xxh64(slot + 32, length, h)
        return h
    }

    /// Writes a value into a slot; the checksum goes last.
    static func set(_ slot: UnsafeMutableRawPointer, key: UInt64, rng: inout SplitMix64) {
        let version = slot.load(fromByteOffset: 8, as: UInt64.self) &+ 1
        let length = 64 + Int(rng.next() % UInt64(valueCapacity - 64))
        slot.storeBytes(of: key, toByteOffset: 0, as: UInt64.self)
        slot.storeBytes(of: version, toByteOffset: 8, as: UInt64.self)
        slot.storeBytes(of: UInt32(length), toByteOffset: 24, as: UInt32.self)
        var off = 0
        while off < length {
            let w = rng.next()
            withUnsafeBytes(of: w) { b in
                for i in 0..<min(8, length - off) { slot.storeBytes(of: b[i], toByteOffset: 32 + off + i, as: UInt8.self) }
            }
            off += 8
        }
        slot.storeBytes(of: checksum(UnsafeRawPointer(slot), length: length), toByteOffset: 16, as: UInt64.self)
    }

    /// Checks a slot: nil when empty, else whether its checksum holds.
    static func verify(_ slot: UnsafeRawPointer, expectedKey: UInt64) -> Bool? {
        let version = slot.load(fromByteOffset: 8, as: UInt64.self)
        if version == 0 { return nil }
        let length = Int(slot.load(fromByteOffset: 24, as: UInt32.self))
        guard length <= valueCapacity, slot.load(as: UInt64.self) == expectedKey else { return false }
        return checksum(slot, length: length) == slot.load(fromByteOffset: 16, as: UInt64.self)
    }
}
