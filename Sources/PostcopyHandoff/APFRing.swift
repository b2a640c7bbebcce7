import Synchronization

/// The shared-memory channel of paravirtual async page faults ("page not
/// present (token)" / "page ready (token)"), version 1: one memfd shared by the
/// guest (VMM) and the daemon, holding a request ring (guest -> daemon: token,
/// guest address, vCPU) and a completion ring (daemon -> guest: token, status),
/// power-of-two rings with free-running u32 indices. All integers little-endian.
///
///     0   magic "PAPF" (u32 0x46504150)     4  version u16 (1)   6  header size u16 (256)
///     8   request entries u32               12 completion entries u32
///     16  request ring offset u32           20 completion ring offset u32
///     64  request producer index (guest)    128 request consumer index (daemon)
///     192 completion producer index (daemon) 224 completion consumer index (guest)
///     request entry (32 bytes): token u64, address u64, vCPU u32, flags u32, reserved u64
///     completion entry (16 bytes): token u64, status u32, reserved u32
///
/// The guest can write anything anywhere in this memory at any time, so the
/// daemon reads the layout once (`APFLayout.parse`), keeps its own copy of the
/// indices it owns, checks every index it reads, and never computes an address
/// outside the mapping from guest data.
public enum APF {
    public static let magic: UInt32 = 0x4650_4150  // "PAPF"
    public static let version: UInt16 = 1
    public static let headerSize = 256
    public static let requestEntryBytes = 32
    public static let completionEntryBytes = 16
    public static let maxEntries: UInt32 = 1 << 16
    static let requestProducerOffset = 64
    static let requestConsumerOffset = 128
    static let completionProducerOffset = 192
    static let completionConsumerOffset = 224
}

/// Why an APF channel was refused or shut: the daemon disables APF for that VM
/// (its guest falls back to blocking faults) and logs this.
public enum APFError: Error, Sendable, Equatable, CustomStringConvertible {
    case badHeader(String)
    case badIndex(String)

    public var description: String {
        switch self {
        case .badHeader(let s): return "APF channel header: \(s)"
        case .badIndex(let s): return "APF ring index: \(s)"
        }
    }
}

/// One "page not present" from the guest.
public struct APFRequest: Sendable, Equatable {
    public var token: UInt64
    public var address: UInt64
    public var vcpu: UInt32
    public var flags: UInt32
    public init(token: UInt64, address: UInt64, vcpu: UInt32, flags: UInt32 = 0) {
        self.token = token
        self.address = address
        self.vcpu = vcpu
        self.flags = flags
    }
}

/// The validated layout of one channel, read once when the guest enables it.
public struct APFLayout: Sendable, Equatable {
    public var requestEntries: UInt32
    public var completionEntries: UInt32
    public var requestOffset: Int
    public var completionOffset: Int
    public var size: Int

    public init(requestEntries: UInt32, completionEntries: UInt32, size: Int) {
        self.requestEntries = requestEntries
        self.completionEntries = completionEntries
        requestOffset = APF.headerSize
        completionOffset = APF.headerSize + Int(requestEntries) * APF.requestEntryBytes
        self.size = size
    }

    /// Bytes a channel with these rings needs.
    public static func bytesNeeded(requestEntries: UInt32, completionEntries: UInt32) -> Int {
        APF.headerSize + Int(requestEntries) * APF.requestEntryBytes + Int(completionEntries) * APF.completionEntryBytes
    }

    /// Checks the header in `memory` (the whole shared mapping): magic, version,
    /// power-of-two ring sizes, both rings inside the mapping, after the header,
    /// not overlapping each other.
    public static func parse(_ memory: UnsafeRawBufferPointer) throws(APFError) -> APFLayout {
        guard memory.count >= APF.headerSize else { throw .badHeader("\(memory.count) bytes, less than the \(APF.headerSize)-byte header") }
        func u32(_ o: Int) -> UInt32 { UInt32(littleEndian: memory.loadUnaligned(fromByteOffset: o, as: UInt32.self)) }
        func u16(_ o: Int) -> UInt16 { UInt16(littleEndian: memory.loadUnaligned(fromByteOffset: o, as: UInt16.self)) }
        guard u32(0) == APF.magic else { throw .badHeader("bad magic 0x\(String(u32(0), radix: 16))") }
        guard u16(4) == APF.version else { throw .badHeader("version \(u16(4)), this daemon speaks \(APF.version)") }
        guard Int(u16(6)) == APF.headerSize else { throw .badHeader("header size \(u16(6)), expected \(APF.headerSize)") }
        let req = u32(8), comp = u32(12)
        for (name, n) in [("request", req), ("completion", comp)] {
            guard n >= 1, n <= APF.maxEntries, n & (n - 1) == 0 else {
                throw .badHeader("\(name) ring of \(n) entries (a power of two, 1...\(APF.maxEntries))")
            }
        }
        let reqOff = Int(u32(16)), compOff = Int(u32(20))
        let reqBytes = Int(req) * APF.requestEntryBytes, compBytes = Int(comp) * APF.completionEntryBytes
        guard reqOff >= APF.headerSize, compOff >= APF.headerSize, reqOff % 8 == 0, compOff % 8 == 0,
              reqOff <= memory.count - reqBytes, compOff <= memory.count - compBytes,
              reqOff + reqBytes <= compOff || compOff + compBytes <= reqOff else {
            throw .badHeader("rings at \(reqOff) (\(reqBytes) bytes) and \(compOff) (\(compBytes) bytes) do not fit apart in \(memory.count) bytes after the header")
        }
        var l = APFLayout(requestEntries: req, completionEntries: comp, size: memory.count)
        l.requestOffset = reqOff
        l.completionOffset = compOff
        return l
    }

    /// Writes a fresh header (the guest side does this; tests and the reference guest use it).
    public func writeHeader(into memory: UnsafeMutableRawBufferPointer) {
        func put32(_ o: Int, _ v: UInt32) { memory.storeBytes(of: v.littleEndian, toByteOffset: o, as: UInt32.self) }
        for i in 0..<APF.headerSize { memory[i] = 0 }
        put32(0, APF.magic)
        memory.storeBytes(of: APF.version.littleEndian, toByteOffset: 4, as: UInt16.self)
        memory.storeBytes(of: UInt16(APF.headerSize).littleEndian, toByteOffset: 6, as: UInt16.self)
        put32(8, requestEntries)
        put32(12, completionEntries)
        put32(16, UInt32(requestOffset))
        put32(20, UInt32(completionOffset))
    }
}

/// The daemon's end of one channel: consumes requests, produces completions.
/// Owns the request consumer and completion producer indices (its private
/// copies are the truth; the shared ones are only published).
public struct APFDaemonRing {
    public let layout: APFLayout
    private let memory: UnsafeMutableRawBufferPointer
    private var requestConsumer: UInt32
    private var completionProducer: UInt32

    /// `memory` must be the mapping `layout` was parsed from (`layout.size` bytes).
    public init(layout: APFLayout, memory: UnsafeMutableRawBufferPointer) {
        precondition(memory.count == layout.size)
        self.layout = layout
        self.memory = memory
        requestConsumer = Self.load(memory, APF.requestConsumerOffset)
        completionProducer = Self.load(memory, APF.completionProducerOffset)
    }

    private static func load(_ m: UnsafeMutableRawBufferPointer, _ o: Int) -> UInt32 {
        let v = UInt32(littleEndian: UnsafeRawBufferPointer(m).loadUnaligned(fromByteOffset: o, as: UInt32.self))
        atomicMemoryFence(ordering: .acquiring)
        return v
    }

    private func publish(_ o: Int, _ v: UInt32) {
        atomicMemoryFence(ordering: .releasing)
        memory.storeBytes(of: v.littleEndian, toByteOffset: o, as: UInt32.self)
    }

    /// Takes up to `max` requests the guest posted. A producer index more than a
    /// ring ahead of what was consumed (or behind it) is a broken or hostile guest.
    public mutating func takeRequests(max: Int) throws(APFError) -> [APFRequest] {
        let produced = Self.load(memory, APF.requestProducerOffset)
        let pending = produced &- requestConsumer
        guard pending <= layout.requestEntries else {
            throw .badIndex("request producer \(produced) is \(pending) entries past consumer \(requestConsumer), ring holds \(layout.requestEntries)")
        }
        let n = min(Int(pending), max)
        var out: [APFRequest] = []
        out.reserveCapacity(n)
        let mask = layout.requestEntries - 1
        for _ in 0..<n {
            let o = layout.requestOffset + Int(requestConsumer & mask) * APF.requestEntryBytes
            let m = UnsafeRawBufferPointer(memory)
            out.append(APFRequest(token: UInt64(littleEndian: m.loadUnaligned(fromByteOffset: o, as: UInt64.self)),
                                  address: UInt64(littleEndian: m.loadUnaligned(fromByteOffset: o + 8, as: UInt64.self)),
                                  vcpu: UInt32(littleEndian: m.loadUnaligned(fromByteOffset: o + 16, as: UInt32.self)),
                                  flags: UInt32(littleEndian: m.loadUnaligned(fromByteOffset: o + 20, as: UInt32.self))))
            requestConsumer &+= 1
        }
        if n > 0 { publish(APF.requestConsumerOffset, requestConsumer) }
        return out
    }

    /// Posts as many of `completions` as fit; returns how many (the rest wait
    /// for the guest to consume). A guest consumer index ahead of what was
    /// produced is a broken or hostile guest.
    /// `status`: 0 ready, 1 not guest memory (`APFStatus` raw values).
    public mutating func postCompletions(_ completions: ArraySlice<(token: UInt64, status: UInt32)>) throws(APFError) -> Int {
        let consumed = Self.load(memory, APF.completionConsumerOffset)
        let used = completionProducer &- consumed
        guard used <= layout.completionEntries else {
            throw .badIndex("completion consumer \(consumed) is not within a ring behind producer \(completionProducer)")
        }
        let n = min(Int(layout.completionEntries - used), completions.count)
        let mask = layout.completionEntries - 1
        for c in completions.prefix(n) {
            let o = layout.completionOffset + Int(completionProducer & mask) * APF.completionEntryBytes
            memory.storeBytes(of: c.token.littleEndian, toByteOffset: o, as: UInt64.self)
            memory.storeBytes(of: c.status.littleEndian, toByteOffset: o + 8, as: UInt32.self)
            memory.storeBytes(of: UInt32(0), toByteOffset: o + 12, as: UInt32.self)
            completionProducer &+= 1
        }
        if n > 0 { publish(APF.completionProducerOffset, completionProducer) }
        return n
    }
}
