// The handoff fuzz target's input layouts (`Cursor` reads a 0x02 input,
// `sharedInput` writes one) and its seeds (FUZZ_WRITE_SEEDS=DIR).
#if canImport(Glibc)
import Glibc
#endif

// MARK: inputs

/// Reads a 0x02 input (after its first byte).
struct Cursor {
    var rest: ArraySlice<UInt8>
    init(_ bytes: ArraySlice<UInt8>) { rest = bytes }
    mutating func byte() -> UInt8? { rest.popFirst() }
    mutating func take(_ n: Int) -> ArraySlice<UInt8> {
        let out = rest.prefix(n)
        rest = rest.dropFirst(n)
        return out
    }
    mutating func le(_ n: Int) -> UInt64? {
        guard rest.count >= n else { return nil }
        return take(n).reversed().reduce(0) { $0 << 8 | UInt64($1) }
    }
    mutating func u16() -> UInt16? { le(2).map { UInt16($0) } }
    /// One memory file as 15 bytes: kind (bits 0-1: shmem, hugetlbfs, other,
    /// other; bits 2-3: the block size, `blockSizes`), major, minor, inode
    /// (4 bytes LE), size (8 bytes LE).
    mutating func memoryFile() -> MemoryFileInfo? {
        guard let k = byte(), let major = byte(), let minor = byte(), let inode = le(4), let size = le(8) else { return nil }
        let kinds: [MemoryFileInfo.Kind] = [.shmem, .hugetlbfs, .other("a socket"), .other("a file on ext4")]
        return MemoryFileInfo(kind: kinds[Int(k & 3)], deviceMajor: UInt32(major), deviceMinor: UInt32(minor),
                              inode: inode, size: size, blockSize: blockSizes[Int(k >> 2 & 3)])
    }
}

let blockSizes: [UInt64] = [4096, 2 << 20, 1 << 30, 64 << 10]

/// The 0x02 input `Cursor` reads: the fd count, one record per file, the smaps
/// text (its length first, 2 bytes LE), the JSON from the real encoder.
func sharedInput(_ files: [MemoryFileInfo], smaps: String, _ regions: [VMMRegion]) -> [UInt8] {
    func le(_ v: UInt64, _ n: Int) -> [UInt8] { (0..<n).map { UInt8(truncatingIfNeeded: v >> (8 * $0)) } }
    var out: [UInt8] = [0x02, UInt8(files.count)]
    for f in files {
        let kind: UInt8
        switch f.kind {
        case .shmem: kind = 0
        case .hugetlbfs: kind = 1
        case .other: kind = 2
        }
        out += [kind | UInt8(blockSizes.firstIndex(of: f.blockSize)!) << 2, UInt8(f.deviceMajor), UInt8(f.deviceMinor)]
        out += le(f.inode, 4) + le(f.size, 8)
    }
    let text = Array(smaps.utf8)
    out += le(UInt64(text.count), 2) + text + HandoffMessage.encode(regions)
    return out
}

/// One mapping as /proc/PID/smaps shows it (fs/proc/task_mmu.c): the header
/// (its path from column 73), with `detail` the counters, then VmFlags.
func smapsEntry(_ m: VMMMapping, flags: [String], path: String?, perms: String? = nil, kernelPageKiB: UInt64 = 4, detail: Bool = true) -> String {
    func hex(_ v: UInt64, _ width: Int) -> String {
        let s = String(v, radix: 16)
        return String(repeating: "0", count: max(0, width - s.count)) + s
    }
    var out = "\(hex(m.start, 8))-\(hex(m.end, 8)) \(perms ?? (m.shared ? "rw-s" : "rw-p")) \(hex(m.fileOffset, 8)) "
        + "\(hex(UInt64(m.deviceMajor), 2)):\(hex(UInt64(m.deviceMinor), 2)) \(m.inode) "
    if let path { out += String(repeating: " ", count: max(0, 73 - out.utf8.count)) + path }
    out += "\n"
    if detail {
        let kib = (m.end - m.start) / 1024, huge = kernelPageKiB > 4
        let rss = min(kib, 8 * kernelPageKiB)  // a few pages touched already
        let counters: [(String, UInt64)] = [
            ("Size", kib), ("KernelPageSize", kernelPageKiB), ("MMUPageSize", kernelPageKiB), ("Rss", huge ? 0 : rss),
            ("Pss", huge ? 0 : rss), ("Pss_Dirty", huge ? 0 : rss), ("Shared_Clean", 0), ("Shared_Dirty", 0),
            ("Private_Clean", 0), ("Private_Dirty", huge ? 0 : rss), ("Referenced", huge ? 0 : rss), ("Anonymous", 0),
            ("KSM", 0), ("LazyFree", 0), ("AnonHugePages", 0), ("ShmemPmdMapped", 0), ("FilePmdMapped", 0),
            ("Shared_Hugetlb", 0), ("Private_Hugetlb", huge ? rss : 0), ("Swap", 0), ("SwapPss", 0), ("Locked", 0),
        ]
        for (k, v) in counters {
            let key = k + ":", value = String(v)
            out += key + String(repeating: " ", count: max(0, 16 - key.count) + max(0, 8 - value.count)) + value + " kB\n"
        }
        out += "THPeligible:    0\n"
    }
    return out + "VmFlags: " + flags.map { $0 + " " }.joined() + "\n"
}

// MARK: seeds

@_cdecl("LLVMFuzzerInitialize")
public func fuzzInit(_ argc: UnsafeMutablePointer<Int32>, _ argv: UnsafeMutablePointer<UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?>) -> Int32 {
    guard let dir = getenv("FUZZ_WRITE_SEEDS") else { return 0 }
    writeSeeds(dir)
    exit(0)
}

/// Seeds from the real encoder (and `sharedInput`, `smapsEntry`). Returns before
/// `exit` so that LeakSanitizer finds nothing of them still allocated.
@inline(never)
func writeSeeds(_ cDir: UnsafePointer<CChar>) {
    let dir = String(cString: cDir)
    typealias File = VMMRegion.MemoryFileRange
    let gib: UInt64 = 1 << 30, huge: UInt64 = 2 << 20
    // Guest RAM in memfds, as a VMM extended for shared memory sends it.
    let oneRegion = [VMMRegion(base: 0x7f3c_0000_0000, size: gib, offset: 0, pageSize: 4096, file: File(index: 0, offset: 0))]
    // x86 below and above the 32-bit hole, and a hotplugged region: two memfds,
    // the first holding regions 0 and 2.
    let threeRegions = [
        VMMRegion(base: 0x7f3c_0000_0000, size: 3 * gib, offset: 0, pageSize: 4096, file: File(index: 0, offset: 0)),
        VMMRegion(base: 0x7f3d_0000_0000, size: gib, offset: 3 * gib, pageSize: 4096, file: File(index: 1, offset: 0)),
        VMMRegion(base: 0x7f3e_0000_0000, size: 512 << 20, offset: 4 * gib, pageSize: 4096, file: File(index: 0, offset: 3 * gib)),
    ]
    let hugeRegion = [VMMRegion(base: 0x7f40_0000_0000, size: gib, offset: 0, pageSize: huge, file: File(index: 0, offset: 0))]
    let messages = [
        HandoffMessage.encode([VMMRegion(base: 0x7f00_0000_0000, size: 1 << 30, offset: 0, pageSize: 4096)]),
        HandoffMessage.encode([VMMRegion(base: 0x7f00_0000_0000, size: 1 << 21, offset: 0, pageSize: 4096),
                               VMMRegion(base: 0x7f10_0000_0000, size: 1 << 22, offset: 1 << 21, pageSize: 4096)]),
        HandoffMessage.encode([VMMRegion(base: 0x7f00_0000_0000, size: 1 << 22, offset: 0, pageSize: 2 << 20)]),
        Array("[{\"base_host_virt_addr\":140737488355328,\"size\":4096,\"offset\":0,\"page_size_kib\":4096}]".utf8),
        Array("[]".utf8),
        Array("{\"not\":\"a list\"}".utf8),
        HandoffMessage.encode(oneRegion),
        HandoffMessage.encode(threeRegions),
        HandoffMessage.encode(hugeRegion),
        HandoffMessage.encode([VMMRegion(base: 0x7f00_0000_0000, size: 1 << 21, offset: 0, pageSize: 4096, source: "10.1.2.3:7000"),
                               VMMRegion(base: 0x7f10_0000_0000, size: 1 << 22, offset: 1 << 21, pageSize: 4096, source: "10.1.2.3:7000")]),
    ]
    for (i, s) in messages.enumerated() { writeSeed(dir, "handoff-\(i)", s) }

    // The VMM's smaps (fs/proc/task_mmu.c): the guest memfds are shared and
    // registered MISSING and MINOR (um ui). smaps-N are whole entries, counters
    // and all; the shared-N texts keep only what `VMMMapping.parse` reads (the
    // header and VmFlags), small enough for the fuzzer to stay fast.
    let memfdFlags = ["rd", "wr", "sh", "mr", "mw", "me", "ms", "um", "ui", "sd"]
    let hugeFlags = ["rd", "wr", "sh", "mr", "mw", "me", "ms", "de", "ht", "um", "ui", "sd"]
    func vma(_ start: UInt64, _ end: UInt64, shared: Bool = true, offset: UInt64 = 0, _ dev: (UInt32, UInt32), _ inode: UInt64, _ flags: [String]) -> VMMMapping {
        VMMMapping(start: start, end: end, shared: shared, fileOffset: offset, deviceMajor: dev.0, deviceMinor: dev.1, inode: inode, flags: Set(flags))
    }
    let shmemDev: (UInt32, UInt32) = (0, 1), hugeDev: (UInt32, UInt32) = (0, 0x0f)
    let binaryFlags = ["rd", "ex", "mr", "mw", "me", "sd"], stackFlags = ["rd", "wr", "mr", "mw", "me", "gd", "ac"]
    func binary(detail: Bool) -> String {
        smapsEntry(vma(0x5581_1c40_0000, 0x5581_1c6a_3000, shared: false, (8, 1), 1_835_227, binaryFlags),
                   flags: binaryFlags, path: "/usr/bin/firecracker", perms: "r-xp", detail: detail)
    }
    func stack(detail: Bool) -> String {
        smapsEntry(vma(0x7ffd_4a1c_2000, 0x7ffd_4a1e_3000, shared: false, (0, 0), 0, stackFlags), flags: stackFlags, path: "[stack]", detail: detail)
    }
    func guest(_ v: VMMMapping, _ name: String = "guest", pageKiB: UInt64 = 4, flags: [String]? = nil, detail: Bool = false) -> String {
        smapsEntry(v, flags: flags ?? (pageKiB > 4 ? hugeFlags : memfdFlags), path: "/memfd:\(name) (deleted)", kernelPageKiB: pageKiB, detail: detail)
    }
    let guest0 = vma(0x7f3c_0000_0000, 0x7f3c_0000_0000 + gib, shmemDev, 2051, memfdFlags)
    let huge0 = vma(0x7f40_0000_0000, 0x7f40_4000_0000, hugeDev, 40961, hugeFlags)
    let smaps = [
        guest(guest0, detail: true),
        guest(huge0, "guest-huge", pageKiB: 2048, detail: true),
        binary(detail: true) + guest(guest0, detail: true) + stack(detail: true),
    ]
    for (i, s) in smaps.enumerated() { writeSeed(dir, "smaps-\(i)", [0x01] + Array(s.utf8)) }

    let oneText = binary(detail: false) + guest(guest0) + stack(detail: false)
    // Region 0 in two VMAs (split by an madvise), region 2 further into memfd 0.
    let threeText = guest(vma(0x7f3c_0000_0000, 0x7f3c_8000_0000, shmemDev, 2051, memfdFlags))
        + guest(vma(0x7f3c_8000_0000, 0x7f3c_c000_0000, offset: 2 * gib, shmemDev, 2051, memfdFlags))
        + guest(vma(0x7f3d_0000_0000, 0x7f3d_4000_0000, shmemDev, 2052, memfdFlags), "guest-hotplug")
        + guest(vma(0x7f3e_0000_0000, 0x7f3e_2000_0000, offset: 3 * gib, shmemDev, 2051, memfdFlags))
    let hugeText = guest(huge0, "guest-huge", pageKiB: 2048)
    // Registered MISSING only (no ui): refused.
    let missingOnlyText = guest(guest0, flags: ["rd", "wr", "sh", "mr", "mw", "me", "ms", "um", "sd"])
    func memfd(_ inode: UInt64, _ size: UInt64) -> MemoryFileInfo {
        MemoryFileInfo(kind: .shmem, deviceMajor: shmemDev.0, deviceMinor: shmemDev.1, inode: inode, size: size, blockSize: 4096)
    }
    let hugeFile = MemoryFileInfo(kind: .hugetlbfs, deviceMajor: hugeDev.0, deviceMinor: hugeDev.1, inode: 40961, size: gib, blockSize: huge)
    let shared = [
        sharedInput([memfd(2051, gib)], smaps: oneText, oneRegion),
        sharedInput([memfd(2051, 3 * gib + (512 << 20)), memfd(2052, gib)], smaps: threeText, threeRegions),
        sharedInput([hugeFile], smaps: hugeText, hugeRegion),
        sharedInput([memfd(2051, gib)], smaps: missingOnlyText, oneRegion),
    ]
    for (i, s) in shared.enumerated() { writeSeed(dir, "shared-\(i)", s) }
}
