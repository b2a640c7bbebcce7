/// What the daemon learned of one memory file a VMM sent (`fstat`, `fstatfs`).
public struct MemoryFileInfo: Sendable, Equatable {
    public enum Kind: Sendable, Equatable {
        /// tmpfs or a memfd (shmem): 4 KiB pages, MINOR with UFFD_FEATURE_MINOR_SHMEM.
        case shmem
        /// hugetlbfs (a hugetlb memfd or a file under a hugetlbfs mount).
        case hugetlbfs
        /// Anything else, and why it is not shareable guest memory.
        case other(String)
    }
    public var kind: Kind
    public var deviceMajor: UInt32
    public var deviceMinor: UInt32
    public var inode: UInt64
    public var size: UInt64
    /// The file's page size for hugetlbfs (`st_blksize`).
    public var blockSize: UInt64
    public var id: FileID { FileID(deviceMajor: deviceMajor, deviceMinor: deviceMinor, inode: inode) }

    public init(kind: Kind, deviceMajor: UInt32, deviceMinor: UInt32, inode: UInt64, size: UInt64, blockSize: UInt64) {
        self.kind = kind
        self.deviceMajor = deviceMajor
        self.deviceMinor = deviceMinor
        self.inode = inode
        self.size = size
        self.blockSize = blockSize
    }
}

/// One mapping of the VMM process, from `/proc/PID/smaps`.
public struct VMMMapping: Sendable, Equatable {
    public var start: UInt64
    public var end: UInt64
    public var shared: Bool
    /// Byte offset in the file of `start`.
    public var fileOffset: UInt64
    public var deviceMajor: UInt32
    public var deviceMinor: UInt32
    public var inode: UInt64
    /// `VmFlags` (`um`: userfaultfd MISSING, `ui`: userfaultfd MINOR).
    public var flags: Set<String>
    public var id: FileID { FileID(deviceMajor: deviceMajor, deviceMinor: deviceMinor, inode: inode) }

    /// Parses the text of `/proc/PID/smaps`: each mapping's header line
    /// (`start-end perms offset major:minor inode [path]`) and its `VmFlags`.
    public static func parse(_ text: Substring) -> [VMMMapping] {
        var out: [VMMMapping] = []
        for line in text.split(separator: "\n") {
            if line.hasPrefix("VmFlags:") {
                guard !out.isEmpty else { continue }
                out[out.count - 1].flags = Set(line.dropFirst("VmFlags:".count).split(separator: " ").map(String.init))
                continue
            }
            let f = line.split(separator: " ", omittingEmptySubsequences: true)
            guard f.count >= 5, let dash = f[0].firstIndex(of: "-"),
                  let start = UInt64(f[0][..<dash], radix: 16), let end = UInt64(f[0][f[0].index(after: dash)...], radix: 16),
                  f[1].count == 4, let off = UInt64(f[2], radix: 16), let colon = f[3].firstIndex(of: ":"),
                  let major = UInt32(f[3][..<colon], radix: 16), let minor = UInt32(f[3][f[3].index(after: colon)...], radix: 16),
                  let inode = UInt64(f[4]) else { continue }
            out.append(VMMMapping(start: start, end: end, shared: f[1].last == "s", fileOffset: off,
                                  deviceMajor: major, deviceMinor: minor, inode: inode, flags: []))
        }
        return out
    }
}

/// The checks of an extended handoff (regions in memory files) that need no
/// system call: the files against the regions, and the VMM's mappings against
/// both. Each refusal names the region or file and the reason.
public enum SharedMemoryCheck {
    /// Each file must be shmem or hugetlbfs, of the regions' page size, and hold
    /// every region that names it; no two regions may share bytes of one file
    /// (two fds may be the same file: compared by device and inode).
    public static func files(_ regions: [VMMRegion], _ files: [MemoryFileInfo], hostPageSize: Int) throws(HandoffError) {
        for (k, f) in files.enumerated() {
            if case .other(let why) = f.kind { throw .sharedMemory("memory file \(k) is not shareable memory: \(why)") }
        }
        var claimed: [(file: Int, region: Int, range: Range<UInt64>)] = []
        for (i, r) in regions.enumerated() {
            guard let named = r.file else { throw .sharedMemory("region \(i) names no memory file but others do") }
            guard named.index < files.count else { throw .fileDescriptors("region \(i) names memory file \(named.index) of \(files.count)") }
            let f = files[named.index]
            switch f.kind {
            case .hugetlbfs:
                guard r.pageSize == f.blockSize else {
                    throw .sharedMemory("region \(i) has page size \(r.pageSize) but memory file \(named.index) is hugetlbfs with \(f.blockSize)-byte pages")
                }
            case .shmem:
                guard r.pageSize == UInt64(hostPageSize) else {
                    throw .sharedMemory("region \(i) has page size \(r.pageSize) but memory file \(named.index) is shmem (\(hostPageSize)-byte pages; 2 MiB pages need hugetlbfs)")
                }
            case .other: break
            }
            guard named.offset < f.size else {
                throw .sharedMemory("region \(i): offset \(named.offset) is past the end of memory file \(named.index) (\(f.size) bytes)")
            }
            guard named.offset + r.size <= f.size else {
                throw .sharedMemory("memory file \(named.index) (\(f.size) bytes) is smaller than region \(i) needs (\(r.size) bytes at offset \(named.offset))")
            }
            let range = named.offset..<(named.offset + r.size)
            for c in claimed where files[c.file].id == f.id && c.range.overlaps(range) {
                throw .sharedMemory("regions \(c.region) and \(i) overlap in memory file \(named.index) (bytes \(max(c.range.lowerBound, range.lowerBound))..<\(min(c.range.upperBound, range.upperBound)))")
            }
            claimed.append((named.index, i, range))
        }
    }

    /// Each region must be, in the VMM, a shared mapping of the file and offset it
    /// names, registered with its userfaultfd in MISSING and MINOR mode.
    public static func mappings(_ regions: [VMMRegion], _ files: [MemoryFileInfo], vmas: [VMMMapping]) throws(HandoffError) {
        let sorted = vmas.sorted { $0.start < $1.start }
        for (i, r) in regions.enumerated() {
            guard let named = r.file, named.index < files.count else { continue }
            let f = files[named.index]
            var at = r.base
            let end = r.base + r.size
            for v in sorted where v.end > at && v.start < end {
                let hex = "0x\(String(at, radix: 16))"
                guard v.start <= at else { break }
                guard v.shared, v.id == f.id else {
                    throw .sharedMemory("region \(i): the VMM's memory at \(hex) is not a shared mapping of memory file \(named.index)")
                }
                // (smaps offsets come from the kernel, but a parsed one near 2^64
                // must not trap: it simply does not match.)
                let (mapped, overflow) = v.fileOffset.addingReportingOverflow(at - v.start)
                guard !overflow, mapped == named.offset + (at - r.base) else {
                    throw .sharedMemory("region \(i): the VMM maps \(hex) from file offset \(overflow ? "past 2^64" : "\(mapped)"), not \(named.offset + (at - r.base)) as named")
                }
                guard v.flags.contains("um") else {
                    throw .sharedMemory("region \(i): \(hex) is not registered with a userfaultfd in MISSING mode")
                }
                guard v.flags.contains("ui") else {
                    throw .sharedMemory("region \(i): \(hex) is not registered in MINOR mode (UFFDIO_REGISTER_MODE_MINOR after UFFDIO_API with UFFD_FEATURE_MINOR_SHMEM or _MINOR_HUGETLBFS)")
                }
                at = min(v.end, end)
                if at == end { break }
            }
            guard at == end else {
                throw .sharedMemory("region \(i): the VMM has nothing mapped at 0x\(String(at, radix: 16))")
            }
        }
    }
}
