import CPostcopy
import PostcopyCore
#if canImport(Glibc)
import Glibc
#endif

/// The two passes over frozen RAM. The zero pass (`zeroBits`, by chunks:
/// `ZeroPass`) is quick: holes of the memory file are zero without a look, and
/// `cpc_is_zero` stops at the first non-zero byte, which for most pages is one
/// of the first. `digests` reads every byte
/// that holds data, once for the page digests and, while the block is in the
/// cache, once for the RAM digest's chunks; hole pages and chunks take the
/// digest of zeros without being touched.
final class MemoryScanner: @unchecked Sendable {
    let mapping: MemoryMapping
    let pageSize: Int
    let pages: Int
    let holes: FileHoles?
    /// The hole pages, set by `ZeroPass` before the digests (which skip them).
    var holeBits: PageBitmap?

    init(mapping: MemoryMapping, pageSize: Int, holes: FileHoles?) {
        self.mapping = mapping
        self.pageSize = pageSize
        pages = mapping.length / pageSize
        self.holes = holes
    }

    private func isHole(_ p: Int) -> Bool { holeBits?.contains(p) ?? false }

    /// The first pass over `range` (a `ZeroPass` chunk, a multiple of 8 pages
    /// unless it ends RAM): sets the bits of its hole pages in `holeOut` and of
    /// its zero pages (holes included) in `zeros`.
    ///
    /// A page in the page cache (`mincore`) is data: `cpc_is_zero` looks at it.
    /// The others are holes unless `SEEK_DATA` says data (swapped out): one
    /// `lseek` per run of them, bounded by the run. (A `SEEK_HOLE` walk from
    /// a chunk's data runs on to the next hole, past the chunk: measured on a
    /// 1 GiB kv guest, 32 chunks walked in turn doubled the whole pass.)
    func zeroBits(pages range: Range<Int>, zeros: UnsafeMutablePointer<UInt8>, holes holeOut: UnsafeMutablePointer<UInt8>) {
        let zero = { (p: Int) in zeros[p >> 3] |= 1 << UInt8(p & 7) }
        let look = { (p: Int) in if cpc_is_zero(self.mapping.base + p * self.pageSize, self.pageSize) != 0 { zero(p) } }
        var resident = [UInt8](repeating: 1, count: range.count)
        guard let holes, mincore(mapping.base + range.lowerBound * pageSize, range.count * pageSize, &resident) == 0 else {
            range.forEach(look)  // no file (nothing is a hole), or mincore failed: look at every page
            return
        }
        var p = range.lowerBound
        while p < range.upperBound {
            guard resident[p - range.lowerBound] & 1 == 0 else {
                look(p)
                p += 1
                continue
            }
            var q = p
            while q < range.upperBound, resident[q - range.lowerBound] & 1 == 0 { q += 1 }
            // [p, q) is not in the page cache: holes, but for the data SEEK_DATA finds.
            var page = p
            while page < q {
                let data = min(holes.nextData(from: page * pageSize) ?? .max, q * pageSize)
                while (page + 1) * pageSize <= data {
                    holeOut[page >> 3] |= 1 << UInt8(page & 7)
                    zero(page)
                    page += 1
                }
                if page < q {
                    look(page)  // data after all (swapped out, or written since mincore: never at a frozen source)
                    page += 1
                }
            }
            p = q
        }
    }

    /// Page digests and the RAM digest (second pass, two threads at `nice`), after the zero pass.
    func digests(zeros: ZeroPages, nice: Int32) -> MemoryScan {
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
            PThread(name: "src-scan-part") { [self] in
                _ = cpc_set_thread_nice(nice)
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
        return MemoryScan(zeros: zeros, pageDigests: Array(pageDigests.prefix(pages)),
                          digest: MemoryDigest.combine(chunkDigests: UnsafeBufferPointer(rebasing: chunkDigests.prefix(chunks))))
    }
}
