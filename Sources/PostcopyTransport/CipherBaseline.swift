import PostcopyCore

/// The cipher alone, for the benchmarks' baseline (`postcopy baseline aes-gcm`):
/// seals `total` bytes in records of `recordBytes` with the stream's AES-256-GCM,
/// then opens them, on this thread; the seconds each took.
public enum CipherBaseline {
    public static func measure(recordBytes: Int, total: Int) throws(TransportError) -> (sealSeconds: Double, openSeconds: Double) {
        let key = (0..<32).map { UInt8($0) }
        let seal = try AEADContext(key: key, encrypt: true), open = try AEADContext(key: key, encrypt: false)
        let plain = UnsafeMutableRawPointer.allocate(byteCount: recordBytes, alignment: 4096)
        let sealed = UnsafeMutableRawPointer.allocate(byteCount: recordBytes + RecordFormat.tagBytes, alignment: 4096)
        defer { plain.deallocate(); sealed.deallocate() }
        plain.initializeMemory(as: UInt8.self, repeating: 0x5A, count: recordBytes)
        var length = UInt32(recordBytes).littleEndian
        let records = max(total / recordBytes, 1)
        var sealNs: UInt64 = 0, openNs: UInt64 = 0
        for _ in 0..<records {
            let t0 = nowNanoseconds()
            try withUnsafeBytes(of: &length) { (l) throws(TransportError) in try seal.begin(length: l.baseAddress!) }
            try seal.update(sealed, plain, recordBytes)
            try seal.seal(tag: sealed + recordBytes)
            let t1 = nowNanoseconds()
            try withUnsafeBytes(of: &length) { (l) throws(TransportError) in try open.begin(length: l.baseAddress!) }
            try open.update(plain, sealed, recordBytes)
            guard open.open(tag: sealed + recordBytes) else { throw .integrity("the baseline's own record did not verify") }
            sealNs += t1 - t0
            openNs += nowNanoseconds() - t1
        }
        return (Double(sealNs) / 1e9, Double(openNs) / 1e9)
    }
}
