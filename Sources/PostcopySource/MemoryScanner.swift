import CPostcopy
import PostcopyCore
#if canImport(Glibc)
import Glibc
#endif

/// The holes of a memory file (`lseek` with `SEEK_DATA` / `SEEK_HOLE`): ranges
/// that hold no data and read as zeros. Shmem counts a page swapped out as
/// data, so a hole is never a page with contents. On a file system without
/// hole support the whole file is data (the kernel's generic answer), and any
/// error is taken as "data": the answer errs on reading a page, never on
/// calling one zero.
final class FileHoles: Sendable {
    let fd: OwnedFD
    /// `SEEK_DATA` and `SEEK_HOLE` (Linux, <unistd.h> with _GNU_SOURCE).
    static let seekData: Int32 = 3, seekHole: Int32 = 4

    init(duplicating raw: Int32) throws(SystemError) {
        fd = OwnedFD(try libcCall("fcntl(F_DUPFD_CLOEXEC)") { fcntl(raw, F_DUPFD_CLOEXEC, 0) })
    }

    /// The first byte of data at or after `offset`; nil when there is none.
    func nextData(from offset: Int) -> Int? {
        let r = lseek(fd.raw, off_t(offset), Self.seekData)
        if r >= 0 { return Int(r) }
        return errno == ENXIO ? nil : offset
    }

    /// The first byte of a hole at or after `offset` (the end of the file is one).
    func nextHole(from offset: Int) -> Int {
        let r = lseek(fd.raw, off_t(offset), Self.seekHole)
        return r >= 0 ? Int(r) : Int.max
    }

    /// Whether [offset, offset+length) holds no data.
    func isHole(offset: Int, length: Int) -> Bool {
        guard let d = nextData(from: offset) else { return true }
        return d >= offset + length
    }

    /// One bit per page of the first `pages`, set for the pages wholly inside a hole.
    func holeBits(pages: Int, pageSize: Int) -> [UInt8] {
        var bits = [UInt8](repeating: 0, count: (pages + 7) / 8)
        let end = pages * pageSize
        var offset = 0
        while offset < end {
            let data = min(nextData(from: offset) ?? end, end)
            // Pages wholly inside [offset, data).
            var p = (offset + pageSize - 1) / pageSize
            while (p + 1) * pageSize <= data {
                bits[p >> 3] |= 1 << UInt8(p & 7)
                p += 1
            }
            guard data < end else { break }
            let hole = nextHole(from: data)
            guard hole > data else { break }  // an error: the rest counts as data
            offset = hole
        }
        return bits
    }

    /// Reads [offset, offset+length) into `buffer`; holes read as zeros and
    /// nothing is allocated (unlike a read through a mapping). False on error.
    func read(into buffer: UnsafeMutableRawPointer, offset: Int, length: Int) -> Bool {
        var done = 0
        while done < length {
            let n = pread(fd.raw, buffer + done, length - done, off_t(offset + done))
            if n < 0, errno == EINTR { continue }
            guard n > 0 else { return false }
            done += n
        }
        return true
    }
}

/// The two passes over frozen RAM. `zeroPages` is quick: holes of the memory
/// file are zero without a look, and `cpc_is_zero` stops at the first non-zero
/// byte, which for most pages is one of the first. `digests` reads every byte
/// that holds data, once for the page digests and, while the block is in the
/// cache, once for the RAM digest's chunks; hole pages and chunks take the
/// digest of zeros without being touched.
final class MemoryScanner: @unchecked Sendable {
    let mapping: MemoryMapping
    let pageSize: Int
    let pages: Int
    let holes: FileHoles?
    private var holeBits: [UInt8]?

    init(mapping: MemoryMapping, pageSize: Int, holes: FileHoles?) {
        self.mapping = mapping
        self.pageSize = pageSize
        pages = mapping.length / pageSize
        self.holes = holes
    }

    private func isHole(_ p: Int) -> Bool { holeBits.map { $0[p >> 3] & (1 << UInt8(p & 7)) != 0 } ?? false }

    /// The zero pages (first pass).
    func zeroPages() -> ZeroPages {
        holeBits = holes?.holeBits(pages: pages, pageSize: pageSize)
        var bits = holeBits ?? [UInt8](repeating: 0, count: (pages + 7) / 8)
        for p in 0..<pages where !isHole(p) && cpc_is_zero(mapping.base + p * pageSize, pageSize) != 0 {
            bits[p >> 3] |= 1 << UInt8(p & 7)
        }
        var count = 0
        for byte in bits { count += byte.nonzeroBitCount }
        return ZeroPages(bits: bits, count: count)
    }

    /// Page digests and the RAM digest (second pass, two threads), after `zeroPages`.
    func digests(zeros: ZeroPages) -> MemoryScan {
        let chunk = MemoryDigest.chunkSize
        let block = max(pageSize, chunk)  // both divide it
        let length = mapping.length
        let blocks = (length + block - 1) / block
        let chunks = (length + chunk - 1) / chunk
        let zeroBuffer = UnsafeMutableRawPointer.allocate(byteCount: block, alignment: 4096)
        zeroBuffer.initializeMemory(as: UInt8.self, repeating: 0, count: block)
        defer { zeroBuffer.deallocate() }
        let zeroPageDigest = cpc_xxh64(zeroBuffer, pageSize, 0)
        let pageDigests = UnsafeMutableBufferPointer<UInt64>.allocate(capacity: max(pages, 1))
        let chunkDigests = UnsafeMutableBufferPointer<UInt64>.allocate(capacity: max(chunks, 1))
        defer { pageDigests.deallocate(); chunkDigests.deallocate() }
        nonisolated(unsafe) let pd = pageDigests, cd = chunkDigests, zb = UnsafeRawPointer(zeroBuffer)
        nonisolated(unsafe) let base = UnsafeRawPointer(mapping.base)
        let workers = (0..<2).map { w in
            PThread(name: "src-scan-part", priority: .low) { [self] in
                let staging = UnsafeMutableRawPointer.allocate(byteCount: chunk, alignment: 4096)
                defer { staging.deallocate() }
                var b = w
                while b < blocks {
                    let start = b * block
                    let end = min(start + block, length)
                    for p in (start / pageSize)..<(end / pageSize) {
                        pd[p] = isHole(p) ? zeroPageDigest : cpc_xxh64(base + p * pageSize, pageSize, 0)
                    }
                    var c = start
                    while c < end {
                        let n = min(chunk, end - c)
                        let covered = (c / pageSize)...((c + n - 1) / pageSize)
                        let holePages = covered.count { isHole($0) }
                        let digest: UInt64
                        if holePages == covered.count {
                            digest = cpc_xxh64(zb, n, 0)
                        } else if holePages == 0 {
                            digest = cpc_xxh64(base + c, n, 0)
                        } else if let holes, holes.read(into: staging, offset: c, length: n) {
                            digest = cpc_xxh64(staging, n, 0)
                        } else {
                            digest = cpc_xxh64(base + c, n, 0)  // a read error: the mapping has the same bytes
                        }
                        cd[c / chunk] = digest.littleEndian
                        c += n
                    }
                    b += 2
                }
            }
        }
        workers.forEach { $0.join() }
        return MemoryScan(zeroBits: zeros.bits, zeroPages: zeros.count, pageDigests: Array(pageDigests.prefix(pages)),
                          digest: MemoryDigest.combine(chunkDigests: UnsafeBufferPointer(rebasing: chunkDigests.prefix(chunks))))
    }
}
