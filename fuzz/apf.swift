#if canImport(Glibc)
import Glibc
#endif
// libFuzzer target: the daemon's reader of the APF shared rings. The input is
// the whole shared memory as a hostile guest left it (header, indices, entries);
// the daemon must refuse it or consume and complete within it, never outside
// (AddressSanitizer checks every access). Built with APFRing.swift by fuzz/run.sh.
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzAPF(_ data: UnsafePointer<UInt8>, _ size: Int) -> Int32 {
    // An exact-size copy: ASan reports any byte read or written past it.
    let mem = UnsafeMutableRawBufferPointer.allocate(byteCount: size, alignment: 64)
    defer { mem.deallocate() }
    mem.copyMemory(from: UnsafeRawBufferPointer(start: data, count: size))
    guard let layout = try? APFLayout.parse(UnsafeRawBufferPointer(mem)) else { return 0 }
    var ring = APFDaemonRing(layout: layout, memory: mem)
    for round in 0..<4 {
        guard let reqs = try? ring.takeRequests(max: 64) else { return 0 }
        precondition(reqs.count <= Int(layout.requestEntries))
        let done = reqs.map { (token: $0.token, status: UInt32(0)) }
        guard let n = try? ring.postCompletions(done[...]) else { return 0 }
        precondition(n <= done.count)
        // The guest moves its indices between rounds: take them from the input.
        if size >= 8 {
            let p = UInt32(data[round % size]) | UInt32(data[(round + 1) % size]) << 8
            mem.storeBytes(of: p, toByteOffset: 64, as: UInt32.self)
            mem.storeBytes(of: p &- UInt32(data[(round + 2) % size] & 7), toByteOffset: 224, as: UInt32.self)
        }
    }
    return 0
}

@_cdecl("LLVMFuzzerInitialize")
public func fuzzInit(_ argc: UnsafeMutablePointer<Int32>, _ argv: UnsafeMutablePointer<UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?>) -> Int32 {
    guard let dir = getenv("FUZZ_WRITE_SEEDS").map({ String(cString: $0) }) else { return 0 }
    for (req, comp, posted) in [(UInt32(8), UInt32(8), 3), (4, 16, 4), (1, 1, 1), (16, 4, 0)] {
        let size = APFLayout.bytesNeeded(requestEntries: req, completionEntries: comp)
        let mem = UnsafeMutableRawBufferPointer.allocate(byteCount: size, alignment: 64)
        mem.initializeMemory(as: UInt8.self, repeating: 0)
        let l = APFLayout(requestEntries: req, completionEntries: comp, size: size)
        l.writeHeader(into: mem)
        for i in 0..<posted {
            let o = l.requestOffset + i * APF.requestEntryBytes
            mem.storeBytes(of: UInt64(100 + i), toByteOffset: o, as: UInt64.self)
            mem.storeBytes(of: UInt64(0x7f00_0000_0000 + 4096 * i), toByteOffset: o + 8, as: UInt64.self)
        }
        mem.storeBytes(of: UInt32(posted), toByteOffset: 64, as: UInt32.self)
        writeSeed(dir, "apf-\(req)-\(comp)-\(posted)", Array(mem))
        mem.deallocate()
    }
    exit(0)
}
