import CPostcopy
#if canImport(Glibc)
import Glibc
#endif

/// Owns one mmap'd range and unmaps it in deinit.
public final class MemoryMapping: @unchecked Sendable {
    public let base: UnsafeMutableRawPointer
    public let length: Int

    private init(base: UnsafeMutableRawPointer, length: Int) {
        self.base = base
        self.length = length
    }

    /// Anonymous private memory (what a VMM gives a guest without a memory file).
    public static func anonymous(length: Int) throws(SystemError) -> MemoryMapping {
        let p = mmap(nil, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
        guard let p, p != MAP_FAILED else { throw SystemError("mmap(anonymous, \(length) bytes)", errno: Glibc.errno) }
        return MemoryMapping(base: p, length: length)
    }

    /// Anonymous memory backed by 2 MiB hugetlbfs pages (needs vm.nr_hugepages).
    public static func anonymousHuge(length: Int) throws(SystemError) -> MemoryMapping {
        let p = mmap(nil, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_HUGETLB, -1, 0)
        guard let p, p != MAP_FAILED else { throw SystemError("mmap(MAP_HUGETLB, \(length) bytes)", errno: Glibc.errno) }
        return MemoryMapping(base: p, length: length)
    }

    /// Maps a memory file (a /dev/shm object, memfd or regular file) shared.
    public static func file(fd: Int32, length: Int, offset: Int = 0, writable: Bool) throws(SystemError) -> MemoryMapping {
        let prot = writable ? (PROT_READ | PROT_WRITE) : PROT_READ
        let p = mmap(nil, length, prot, MAP_SHARED, fd, off_t(offset))
        guard let p, p != MAP_FAILED else { throw SystemError("mmap(file, \(length) bytes)", errno: Glibc.errno) }
        return MemoryMapping(base: p, length: length)
    }

    public var address: UInt64 { UInt64(UInt(bitPattern: base)) }
    public var range: Range<UInt64> { address..<(address + UInt64(length)) }
    public var bytes: UnsafeRawBufferPointer { UnsafeRawBufferPointer(start: base, count: length) }

    deinit { munmap(base, length) }
}

/// Guest RAM in a memory file (memfd, shmem): the guest's view of it and the
/// file, so that the daemon can map its own alias of the same pages.
public struct SharedMemory: Sendable {
    public let file: OwnedFD
    public let guest: MemoryMapping
    public var length: Int { guest.length }

    /// Another shared read-write mapping of the whole file: writes through it
    /// land in the same page cache pages the guest view maps.
    public func alias() throws(SystemError) -> MemoryMapping {
        try MemoryMapping.file(fd: file.raw, length: length, writable: true)
    }
}

extension MemoryMapping {
    /// A fresh memfd (`memfd_create(2)`) of `length` bytes, mapped shared: the
    /// guest view. Nothing is allocated yet; `SharedMemory.alias()` maps it again.
    /// `hugePages`: `adviseHugePages` on the mapping (guest RAM a VMM wants in
    /// huge folios where the host allows them).
    public static func sharedMemfd(length: Int, name: String = "guest-ram", hugePages: Bool = false) throws(SystemError) -> SharedMemory {
        let raw = try sysCall("memfd_create(\(name))") { cpc_memfd_create(name, CPC_MFD_CLOEXEC) }
        let file = OwnedFD(raw)
        _ = try libcCall("ftruncate(memfd \(name), \(length))") { ftruncate(raw, off_t(length)) }
        let guest = try MemoryMapping.file(fd: raw, length: length, writable: true)
        if hugePages { guest.adviseHugePages() }
        return SharedMemory(file: file, guest: guest)
    }

    /// `madvise(MADV_HUGEPAGE)`: transparent huge pages for this mapping where
    /// the host allows them on request (for shared memory: `shmem_enabled`
    /// advise, within_size or always; with never, nothing changes). A hint:
    /// its failure changes nothing either.
    public func adviseHugePages() {
        _ = madvise(base, length, 14 /* MADV_HUGEPAGE */)
    }

    /// The host's transparent-huge-page setting for shared memory (the
    /// bracketed word of /sys/kernel/mm/transparent_hugepage/shmem_enabled),
    /// or nil when the kernel has none.
    public static var sharedHugePagesSetting: String? {
        let fd = open("/sys/kernel/mm/transparent_hugepage/shmem_enabled", O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        var buf = [UInt8](repeating: 0, count: 256)
        let n = buf.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
        guard n > 0 else { return nil }
        let text = String(decoding: buf.prefix(n), as: UTF8.self)
        guard let l = text.firstIndex(of: "["), let r = text.firstIndex(of: "]"), l < r else { return nil }
        return String(text[text.index(after: l)..<r])
    }

    /// Allocates every page of the mapping as a write fault would, without
    /// writing the bytes (`madvise(MADV_POPULATE_WRITE)`, Linux 5.14), in chunks
    /// so an interrupted call (EINTR) redoes little; a chunk is idempotent.
    public func populateWrite(chunk: Int = 64 << 20) throws(SystemError) {
        var off = 0
        while off < length {
            let n = min(chunk, length - off)
            _ = try sysCall("madvise(MADV_POPULATE_WRITE, \(n) bytes at offset \(off))") {
                cpc_madvise_populate_write(base + off, n)
            }
            off += n
        }
    }

    /// This host's page size, sysconf(_SC_PAGESIZE): what anonymous mappings are
    /// made of, and the default page size of guests over them.
    public static let systemPageSize = Int(sysconf(Int32(_SC_PAGESIZE)))
}

/// A memory file opened by path, with its size.
public struct MemoryFile: Sendable {
    public let path: String
    public let fd: OwnedFD
    public let size: Int

    /// `SEEK_DATA` (Linux, <unistd.h> with _GNU_SOURCE).
    static let seekData: Int32 = 3

    /// The first byte of data at or after `offset` in the file behind `fd`
    /// (`lseek` with `SEEK_DATA`); nil when there is none. Any error answers
    /// `offset` (data): a caller errs on reading a page, never on calling it zero.
    public static func nextData(_ fd: Int32, from offset: Int) -> Int? {
        let r = lseek(fd, off_t(offset), seekData)
        if r >= 0 { return Int(r) }
        return errno == ENXIO ? nil : offset
    }

    /// Whether [offset, offset+length) of the file behind `fd` holds no data:
    /// every byte reads as zero.
    public static func rangeIsHole(_ fd: Int32, offset: Int, length: Int) -> Bool {
        guard let d = nextData(fd, from: offset) else { return true }
        return d >= offset + length
    }

    public static func open(_ path: String, writable: Bool = false) throws(SystemError) -> MemoryFile {
        let fd = try libcCall("open(\(path))") { Glibc.open(path, (writable ? O_RDWR : O_RDONLY) | O_CLOEXEC) }
        var st = stat()
        _ = try libcCall("fstat(\(path))") { fstat(fd, &st) }
        return MemoryFile(path: path, fd: OwnedFD(fd), size: Int(st.st_size))
    }

    /// Creates (or truncates) a memory file of `size` bytes filled with a
    /// deterministic pseudo-random pattern, with `zeroPercent` of its pages left zero.
    public static func create(path: String, size: Int, pageSize: Int, zeroPercent: Int, seed: UInt64) throws(SystemError) {
        let fd = try libcCall("open(\(path))") { Glibc.open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600) }
        defer { Glibc.close(fd) }
        _ = try libcCall("ftruncate(\(path))") { ftruncate(fd, off_t(size)) }
        let map = try MemoryMapping.file(fd: fd, length: size, writable: true)
        let pages = size / pageSize
        var rng = SplitMix64(seed: seed)
        for p in 0..<pages where Int(rng.next() % 100) >= zeroPercent {
            cpc_fill_random(map.base + p * pageSize, pageSize, seed &+ UInt64(p) &* 0x9E37_79B9)
        }
    }
}

/// Small deterministic PRNG (splitmix64); used for memory patterns and touch orders.
public struct SplitMix64: RandomNumberGenerator, Sendable {
    private var state: UInt64
    public init(seed: UInt64) { state = seed }
    public mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

/// Parses sizes such as 4096, 64K, 256M, 1G, 1GiB.
public func parseByteSize(_ text: String) -> Int? {
    var s = text.filter { $0 != " " }.uppercased()
    for suffix in ["IB", "B"] where s.hasSuffix(suffix) { s.removeLast(suffix.count); break }
    var mult = 1
    if let last = s.last, let shift = ["K": 10, "M": 20, "G": 30, "T": 40][String(last)] {
        mult = 1 << shift
        s.removeLast()
    }
    guard let v = Int(s), v >= 0 else { return nil }
    let (r, o) = v.multipliedReportingOverflow(by: mult)
    return o ? nil : r
}

/// Formats a byte count for people (1.00 GiB).
public func formatBytes(_ n: Double) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"]
    var v = n, i = 0
    while v >= 1024, i < units.count - 1 { v /= 1024; i += 1 }
    return i == 0 ? "\(Int(v)) B" : "\(fixed(v, 2)) \(units[i])"
}

/// Formats `v` with `digits` decimals, without Foundation.
public func fixed(_ v: Double, _ digits: Int) -> String {
    guard v.isFinite else { return "\(v)" }
    var scale = 1.0
    for _ in 0..<digits { scale *= 10 }
    let r = (abs(v) * scale).rounded()
    let whole = Int(r / scale)
    var frac = String(Int(r - Double(whole) * scale))
    while frac.count < digits { frac = "0" + frac }
    return (v < 0 && r != 0 ? "-" : "") + String(whole) + (digits > 0 ? "." + frac : "")
}
