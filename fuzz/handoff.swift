#if canImport(Glibc)
import Glibc
#endif
// libFuzzer target: the VMM handoff message (Firecracker's JSON region list).
// Built with Sources/PostcopyHandoff/HandoffMessage.swift by fuzz/run.sh.
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzHandoff(_ data: UnsafePointer<UInt8>, _ size: Int) -> Int32 {
    guard size <= HandoffMessage.maxBytes else { return 0 }  // the daemon refuses longer messages unread
    let bytes = Array(UnsafeBufferPointer(start: data, count: size))
    if let regions = try? HandoffMessage.parse(bytes, hostPageSize: 4096) {
        precondition(!regions.isEmpty)
        for r in regions {
            precondition(r.size > 0 && r.size % r.pageSize == 0 && r.base % r.pageSize == 0 && r.offset % r.pageSize == 0)
            precondition(r.base <= UInt64.max - r.size && r.offset <= UInt64.max - r.size)
        }
        // What we accept, we can say again.
        precondition((try? HandoffMessage.parse(HandoffMessage.encode(regions), hostPageSize: 4096)) == regions)
    }
    return 0
}

@_cdecl("LLVMFuzzerInitialize")
public func fuzzInit(_ argc: UnsafeMutablePointer<Int32>, _ argv: UnsafeMutablePointer<UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?>) -> Int32 {
    guard let dir = getenv("FUZZ_WRITE_SEEDS").map({ String(cString: $0) }) else { return 0 }
    let seeds = [
        HandoffMessage.encode([VMMRegion(base: 0x7f00_0000_0000, size: 1 << 30, offset: 0, pageSize: 4096)]),
        HandoffMessage.encode([VMMRegion(base: 0x7f00_0000_0000, size: 1 << 21, offset: 0, pageSize: 4096),
                               VMMRegion(base: 0x7f10_0000_0000, size: 1 << 22, offset: 1 << 21, pageSize: 4096)]),
        HandoffMessage.encode([VMMRegion(base: 0x7f00_0000_0000, size: 1 << 22, offset: 0, pageSize: 2 << 20)]),
        Array("[{\"base_host_virt_addr\":140737488355328,\"size\":4096,\"offset\":0,\"page_size_kib\":4096}]".utf8),
        Array("[]".utf8),
        Array("{\"not\":\"a list\"}".utf8),
    ]
    for (i, s) in seeds.enumerated() { writeSeed(dir, "handoff-\(i)", s) }
    exit(0)
}
