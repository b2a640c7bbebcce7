import CPostcopy
import PostcopyCore
import PostcopyDestination
#if canImport(Glibc)
import Glibc
#endif

/// A VMM's guest RAM in shared memory files, as the daemon takes it over: the
/// files (checked), the daemon's alias of each region, preallocated before the
/// switchover, and the install path that writes through them (`InstallPath.continue`).
final class VMMSharedMemory: @unchecked Sendable {
    let files: [OwnedFD]
    /// One per region, in region order.
    let aliases: [MemoryMapping]
    let preallocationNanoseconds: UInt64
    let installPath: InstallPath

    /// Checks `fds` (owned from now on: closed with this object, or on failure)
    /// against `regions` and the VMM's own mappings (`/proc/PID/smaps`), maps an
    /// alias of each region and preallocates it (`MADV_POPULATE_WRITE`).
    init(regions: [VMMRegion], fds: [Int32], vmmPid: Int32, hostPageSize: Int) throws(HandoffError) {
        files = fds.map { OwnedFD($0) }
        let infos = files.map { Self.info($0.raw) }
        try SharedMemoryCheck.files(regions, infos, hostPageSize: hostPageSize)
        let smaps: String
        do { smaps = try Self.readProcFile("/proc/\(vmmPid)/smaps") } catch {
            throw .sharedMemory("cannot read the VMM's mappings to check its registration: \(error)")
        }
        try SharedMemoryCheck.mappings(regions, infos, vmas: VMMMapping.parse(smaps[...]))
        var aliases: [MemoryMapping] = []
        /// Per region: its file range held no data before preallocation.
        let zeroAtStart: [Bool]
        do {
            for r in regions {
                let f = r.file!
                aliases.append(try MemoryMapping.file(fd: files[f.index].raw, length: Int(r.size), offset: Int(f.offset), writable: true))
            }
            // Before preallocation: a range with no data yet (a fresh file)
            // reads zero in every page the daemon has not written since.
            zeroAtStart = regions.map { r in
                MemoryFile.rangeIsHole(fds[r.file!.index], offset: Int(r.file!.offset), length: Int(r.size))
            }
            let t0 = nowNanoseconds()
            for a in aliases {
                // Huge folios where the host allows them for shared memory
                // (`shmem_enabled` advise, within_size or always): the guest's
                // faults after the switch then map 2 MiB at a time, not 4 KiB.
                a.adviseHugePages()
                try a.populateWrite()
            }
            preallocationNanoseconds = nowNanoseconds() - t0
        } catch {
            throw .sharedMemory("\(error)")
        }
        self.aliases = aliases
        let files = files
        installPath = .continue(aliases: regions.indices.map { i in
            let r = regions[i]
            return SharedAlias(guestBase: r.base, aliasBase: aliases[i].address, fileFD: files[r.file!.index].raw,
                               fileOffset: r.file!.offset, zeroAtStart: zeroAtStart[i])
        })
    }

    /// 0x01021994 (TMPFS_MAGIC: tmpfs, memfd) and 0x958458f6 (HUGETLBFS_MAGIC).
    static let tmpfsMagic: Int64 = 0x0102_1994, hugetlbfsMagic: Int64 = 0x9584_58F6

    static func info(_ fd: Int32) -> MemoryFileInfo {
        var st = stat()
        guard fstat(fd, &st) == 0 else {
            return MemoryFileInfo(kind: .other("fstat failed: \(String(cString: strerror(errno)))"), deviceMajor: 0, deviceMinor: 0, inode: 0, size: 0, blockSize: 0)
        }
        let dev = UInt64(st.st_dev)
        let major = UInt32(truncatingIfNeeded: ((dev >> 8) & 0xfff) | ((dev >> 32) & ~0xfff))
        let minor = UInt32(truncatingIfNeeded: (dev & 0xff) | ((dev >> 12) & ~0xff))
        var kind = MemoryFileInfo.Kind.other("not a regular file (a socket, pipe, eventfd or device)")
        if (st.st_mode & S_IFMT) == S_IFREG {
            let type = cpc_fs_type(fd)
            if type < 0 {
                kind = .other("fstatfs failed: \(String(cString: strerror(Int32(-type))))")
            } else if type == tmpfsMagic {
                kind = .shmem
            } else if type == hugetlbfsMagic {
                kind = .hugetlbfs
            } else {
                kind = .other("a file on a filesystem of type 0x\(String(type, radix: 16)), neither tmpfs/memfd nor hugetlbfs")
            }
        }
        return MemoryFileInfo(kind: kind, deviceMajor: major, deviceMinor: minor, inode: UInt64(st.st_ino),
                              size: UInt64(max(st.st_size, 0)), blockSize: UInt64(max(st.st_blksize, 0)))
    }

    /// A /proc file whole (they report size 0: read until EOF).
    static func readProcFile(_ path: String) throws(SystemError) -> String {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw SystemError("open(\(path))", errno: errno) }
        defer { close(fd) }
        var out: [UInt8] = []
        var buf = [UInt8](repeating: 0, count: 64 << 10)
        while true {
            let n = buf.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if n < 0 {
                if errno == EINTR { continue }
                throw SystemError("read(\(path))", errno: errno)
            }
            if n == 0 { break }
            out += buf[0..<n]
        }
        return String(decoding: out, as: UTF8.self)
    }
}
