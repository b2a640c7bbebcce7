#if canImport(Glibc)
import Glibc
#endif
// libFuzzer target: what a VMM hands the daemon. Built by fuzz/run.sh with
// Sources/PostcopyHandoff/HandoffMessage.swift and SharedMemoryCheck.swift.
// The first byte says what an input is (no JSON text starts with 0x01 or 0x02,
// so a plain message is still just its JSON):
//   0x01  the text of /proc/PID/smaps (VMMMapping.parse)
//   0x02  an extended handoff, checked as the daemon does (HandoffServer+Session,
//         VMMSharedMemory): the fd count after the userfaultfd, the memory files'
//         fstat, the VMM's smaps and the JSON (layout: `sharedInput` below)
//   else  the JSON message alone (Firecracker's region list, or with mem_fd_*)

let hostPage = 4096

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzHandoff(_ data: UnsafePointer<UInt8>, _ size: Int) -> Int32 {
    guard size <= HandoffMessage.maxBytes else { return 0 }  // the daemon refuses longer messages unread
    let bytes = Array(UnsafeBufferPointer(start: data, count: size))
    switch bytes.first {
    case 0x01: fuzzSmaps(bytes[1...])
    case 0x02: fuzzShared(bytes[1...])
    default: fuzzMessage(bytes)
    }
    return 0
}

/// The JSON alone: what is accepted is well formed, says itself again, and the
/// fd check agrees with the files the regions name for every fd count the daemon
/// receives (0...maxMemoryFiles after the userfaultfd).
func fuzzMessage(_ bytes: [UInt8]) {
    guard let regions = decode(bytes) else { return }
    // What we accept, we can say again.
    precondition((try? HandoffMessage.parse(HandoffMessage.encode(regions), hostPageSize: hostPage)) == regions)
    for extra in 0...HandoffMessage.maxMemoryFiles { _ = checkFDs(regions, extra: extra) }
}

/// Parses a message and checks what `parse` promises of the regions it accepts.
func decode(_ bytes: [UInt8]) -> [VMMRegion]? {
    let regions: [VMMRegion]
    do throws(HandoffError) {
        regions = try HandoffMessage.parse(bytes, hostPageSize: hostPage)
    } catch {
        precondition(!error.description.isEmpty)
        return nil
    }
    precondition(!regions.isEmpty)
    for r in regions {
        precondition(r.pageSize == regions[0].pageSize, "one page size per VM")
        precondition(r.size > 0 && r.size % r.pageSize == 0 && r.base % r.pageSize == 0 && r.offset % r.pageSize == 0)
        precondition(r.base <= UInt64.max - r.size && r.offset <= UInt64.max - r.size)
        precondition((r.file == nil) == (regions[0].file == nil), "memory files for all regions or none")
        if let f = r.file {
            precondition((0..<HandoffMessage.maxMemoryFiles).contains(f.index))
            precondition(f.offset % r.pageSize == 0 && f.offset <= UInt64.max - r.size)
        }
    }
    let named = regions.compactMap { $0.file?.index }
    precondition(HandoffMessage.memoryFileCount(regions) == (named.max().map { $0 + 1 } ?? 0))
    return regions
}

/// `checkFileDescriptors` accepts exactly when the fds are the files named: 0..<extra.
func checkFDs(_ regions: [VMMRegion], extra: Int) -> Bool {
    let ok: Bool
    do throws(HandoffError) {
        try HandoffMessage.checkFileDescriptors(regions, extra: extra)
        ok = true
    } catch {
        precondition(!error.description.isEmpty)
        ok = false
    }
    precondition(ok == (Set(regions.compactMap { $0.file?.index }) == Set(0..<extra)),
                 "checkFileDescriptors(extra: \(extra)) \(ok ? "accepted" : "refused") \(regions)")
    return ok
}

/// smaps text: parsing never fails, and for what /proc writes (ASCII, lines
/// ended by LF alone) the mappings read, written again, read the same.
func fuzzSmaps(_ bytes: ArraySlice<UInt8>) {
    let maps = VMMMapping.parse(String(decoding: bytes, as: UTF8.self)[...])
    // (CR and non-ASCII text is parsed by grapheme clusters: "\r\n" is one
    // Character, a flag may absorb the next one; not checked for a round trip.)
    guard bytes.allSatisfy({ $0 < 0x80 && $0 != 0x0D }) else { return }
    let again = maps.map { smapsEntry($0, flags: $0.flags.sorted(), path: nil, detail: false) }.joined()
    precondition(VMMMapping.parse(again[...]) == maps, "smaps round trip:\n\(again)")
}

/// An extended handoff, in the daemon's order: parse, checkFileDescriptors, and
/// when the regions name memory files, SharedMemoryCheck.files then .mappings.
func fuzzShared(_ input: ArraySlice<UInt8>) {
    var c = Cursor(input)
    guard let n = c.byte() else { return }
    let extra = Int(n) % (HandoffMessage.maxMemoryFiles + 1)  // the receiver refuses more
    var infos: [MemoryFileInfo] = []
    for _ in 0..<extra {
        guard let f = c.memoryFile() else { return }
        infos.append(f)
    }
    guard let textLength = c.u16() else { return }
    let text = c.take(Int(textLength))
    guard let regions = decode(Array(c.rest)), checkFDs(regions, extra: extra),
          HandoffMessage.memoryFileCount(regions) > 0 else { return }
    do throws(HandoffError) {
        try SharedMemoryCheck.files(regions, infos, hostPageSize: hostPage)
    } catch {
        precondition(!error.description.isEmpty)
        return
    }
    checkFilesAccepted(regions, infos)
    // Any offsets, those the kernel never shows (offset + length past a
    // loff_t) included: `mappings` must refuse them, never trap.
    let vmas = VMMMapping.parse(String(decoding: text, as: UTF8.self)[...]).filter { v in v.start < v.end }
    do throws(HandoffError) {
        try SharedMemoryCheck.mappings(regions, infos, vmas: vmas)
    } catch {
        precondition(!error.description.isEmpty)
        return
    }
    checkMappingsAccepted(regions, infos, vmas)
}

/// Files accepted: all shareable, each region inside its file at the file's page
/// size, no two regions sharing bytes of one file (by device and inode).
func checkFilesAccepted(_ regions: [VMMRegion], _ infos: [MemoryFileInfo]) {
    for f in infos {
        if case .other = f.kind { preconditionFailure("an unshareable memory file was accepted: \(f)") }
    }
    func id(_ r: VMMRegion) -> MemoryFileInfo { infos[r.file!.index] }
    for (i, r) in regions.enumerated() {
        let f = id(r), o = r.file!.offset
        precondition(r.pageSize == (f.kind == .hugetlbfs ? f.blockSize : UInt64(hostPage)), "region \(i): page size \(r.pageSize) in \(f)")
        precondition(o < f.size && o + r.size <= f.size, "region \(i) past the end of \(f)")
        for (j, s) in regions.enumerated() where j < i {
            let g = id(s)
            guard g.id == f.id else { continue }
            precondition(!(o..<(o + r.size)).overlaps(s.file!.offset..<(s.file!.offset + s.size)), "regions \(j) and \(i) overlap in a file")
        }
    }
}

/// Mappings accepted: each region's first and last byte lie in a shared mapping
/// of its file, at the offset named, registered MISSING and MINOR.
func checkMappingsAccepted(_ regions: [VMMRegion], _ infos: [MemoryFileInfo], _ vmas: [VMMMapping]) {
    for (i, r) in regions.enumerated() {
        let named = r.file!, f = infos[named.index]
        for a in [r.base, r.base + r.size - 1] {
            precondition(vmas.contains { v in
                v.start <= a && a < v.end && v.shared && v.id == f.id && v.flags.contains("um") && v.flags.contains("ui")
                    && v.fileOffset &+ (a &- v.start) == named.offset &+ (a &- r.base)
            }, "region \(i): 0x\(String(a, radix: 16)) accepted without a matching mapping")
        }
    }
}

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
