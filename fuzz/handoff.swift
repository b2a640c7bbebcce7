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
