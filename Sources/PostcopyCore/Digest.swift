import CPostcopy

/// The integrity digest both sides compute over guest RAM: xxh64 of every 1 MiB
/// chunk (in region order, the last chunk of a region possibly shorter), then
/// xxh64 over those chunk digests. Source and destination must agree byte for byte.
public enum MemoryDigest {
    public static let chunkSize = 1 << 20

    /// Digest over regions given as (base, length), in order. Uses `threads`
    /// threads for the chunk hashes (the combine step is cheap).
    public static func compute(regions: [UnsafeRawBufferPointer], threads: Int = 2) -> UInt64 {
        var chunks: [(UnsafeRawPointer, Int)] = []
        for r in regions {
            guard let base = r.baseAddress else { continue }
            var off = 0
            while off < r.count {
                let n = min(chunkSize, r.count - off)
                chunks.append((base + off, n))
                off += n
            }
        }
        let hashes = UnsafeMutableBufferPointer<UInt64>.allocate(capacity: max(chunks.count, 1))
        defer { hashes.deallocate() }
        let workers = max(1, min(threads, chunks.count))
        nonisolated(unsafe) let chunkList = chunks
        nonisolated(unsafe) let out = hashes
        let pool = (0..<workers).map { w in
            PThread(name: "digest-\(w)") {
                var i = w
                while i < chunkList.count {
                    out[i] = cpc_xxh64(chunkList[i].0, chunkList[i].1, 0).littleEndian
                    i += workers
                }
            }
        }
        pool.forEach { $0.join() }
        return combine(chunkDigests: UnsafeBufferPointer(rebasing: hashes.prefix(chunks.count)))
    }

    /// The digest of RAM from its chunk digests (xxh64 of each 1 MiB chunk,
    /// little-endian, in order), for a caller that hashed the chunks itself.
    public static func combine(chunkDigests: UnsafeBufferPointer<UInt64>) -> UInt64 {
        var none: UInt64 = 0
        guard let base = chunkDigests.baseAddress, !chunkDigests.isEmpty else { return cpc_xxh64(&none, 0, 0x5043) }
        return cpc_xxh64(UnsafeRawPointer(base), chunkDigests.count * 8, 0x5043)
    }

    public static func hex(_ d: UInt64) -> String {
        let s = String(d, radix: 16)
        return String(repeating: "0", count: 16 - s.count) + s
    }
}
