#if canImport(Glibc)
import Glibc
#endif
// libFuzzer target: the wire decoder (every frame a peer can send). Built with
// the sources of PostcopyWire by fuzz/run.sh. A decoded message must re-encode
// and decode to the same type (page and gather data aside: their payload is borrowed).
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzWire(_ data: UnsafePointer<UInt8>, _ size: Int) -> Int32 {
    let input = UnsafeRawBufferPointer(start: data, count: size)
    var offset = 0
    // A stream of frames, as a connection delivers them.
    while offset < size {
        let rest = UnsafeRawBufferPointer(rebasing: input[offset...])
        guard let (m, used) = try? Codec.decodeFrame(rest, pageSize: 4096, maxBody: 1 << 20) else { break }
        precondition(used > 0 && used <= rest.count, "decoder consumed \(used) of \(rest.count) bytes")
        switch m {
        case .pageData, .gatherData: break
        default:
            let again = Codec.encode(m)
            let back = again.withUnsafeBytes { try? Codec.decodeFrame($0, pageSize: 4096, maxBody: 1 << 20) }
            precondition(back?.0.type == m.type, "\(m.type) did not survive a round trip")
        }
        offset += used
    }
    return 0
}

/// Seeds: one frame of every message type, from the real encoder.
@_cdecl("LLVMFuzzerInitialize")
public func fuzzInit(_ argc: UnsafeMutablePointer<Int32>, _ argv: UnsafeMutablePointer<UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?>) -> Int32 {
    guard let dir = getenv("FUZZ_WRITE_SEEDS").map({ String(cString: $0) }) else { return 0 }
    let page = [UInt8](repeating: 0xAB, count: 4096)
    let frames: [[UInt8]] = page.withUnsafeBytes { p in [
        Codec.encode(.hello(Hello(role: .main, capabilities: [.zeroMap, .urgentChannel], sessionID: 7,
                                  extensions: [HandshakeExtension(type: 1, value: [UInt8](repeating: 1, count: 32))]))),
        Codec.encode(.welcome(Welcome(pageSize: 4096, sessionID: 7, capabilities: [.zeroMap], regions: [RegionDescriptor(size: 1 << 20, sourceOffset: 0, name: "ram")], digest: 1, deviceStateSize: 10))),
        Codec.encode(.error(ErrorMessage(code: .outOfRange, message: "no"))),
        Codec.encode(.pageRequest(PageRequest(requestID: 1, region: 0, pageClass: .demand, pageOffset: 3, pageCount: 1))),
        Codec.encode(.pageData(PageDataHeader(requestID: 1, region: 0, pageClass: .demand, isZero: false, pageOffset: 3, pageCount: 1), payload: p)),
        Codec.encode(.zeroMapRequest(ZeroMapRequest(region: 0, firstPage: 0, pageCount: 17))),
        Codec.encode(.zeroMap(ZeroMap(region: 0, firstPage: 0, pageCount: 17, bits: [0xFF, 0, 1]))),
        Codec.encode(.deviceStateRequest(DeviceStateRequest(offset: 0, maxLength: 100))),
        Codec.encode(.deviceState(DeviceState(totalSize: 3, offset: 0, data: [1, 2, 3]))),
        Codec.encode(.complete(Complete(pagesReceived: 9, digest: 5))),
        Codec.encode(.completeAck(CompleteAck(digestMatches: true, pagesSentTwice: 0))),
        Codec.encode(.pageDigestRequest(PageDigestRequest(region: 0, firstPage: 0, pageCount: 2))),
        Codec.encode(.pageDigests(PageDigests(region: 0, firstPage: 0, digests: [1, 2]))),
        Codec.encode(.authChallenge(AuthChallenge(serverNonce: [UInt8](repeating: 2, count: 32), proof: [UInt8](repeating: 3, count: 32)))),
        Codec.encode(.authResponse(AuthResponse(proof: [UInt8](repeating: 4, count: 32)))),
        Codec.encode(.rdmaRequest(RDMARequest())),
        Codec.encode(.rdmaOffer(RDMAOffer(port: 4791, token: [UInt8](repeating: 5, count: 16), remoteAddress: 1 << 40, length: 1 << 20, rkey: 9))),
        Codec.encode(.precopyPassRequest(PrecopyPassRequest(pass: 2))),
        Codec.encode(.dirtySet(DirtySet(pass: 2, isFinal: false, isLastChunk: true, firstPage: 0, pageCount: 4096,
                                        runs: [3..<9, 100..<101], decision: ""))),
        Codec.encode(.dirtySet(DirtySet(pass: 3, isFinal: true, isLastChunk: true, firstPage: 64, pageCount: 40,
                                        runs: (0..<20).map { UInt64(64 + 2 * $0)..<UInt64(65 + 2 * $0) }, decision: "converged"))),
        Codec.encode(.pageData(PageDataHeader(requestID: 2, region: 0, pageClass: .precopy, isZero: true, sourcePaused: true, pageOffset: 3, pageCount: 2),
                               payload: UnsafeRawBufferPointer(start: nil, count: 0))),
        Codec.encode(.gatherRequest(GatherRequest(firstRequestID: 9, pageClass: .background,
                                                  runs: [GatherRun(region: 0, pageOffset: 7, pageCount: 1), GatherRun(region: 0, pageOffset: 2, pageCount: 3)]))),
        Codec.encode(.gatherData(GatherData(firstRequestID: 9, pageClass: .background, sourcePaused: true,
                                            runs: [GatherRun(region: 0, pageOffset: 7, pageCount: 1), GatherRun(region: 0, pageOffset: 2, pageCount: 3, isZero: true)]),
                                 payload: p)),
    ] }
    for (i, f) in frames.enumerated() { writeSeed(dir, "frame-\(i)", f) }
    writeSeed(dir, "stream", frames.flatMap { $0 })
    exit(0)
}
