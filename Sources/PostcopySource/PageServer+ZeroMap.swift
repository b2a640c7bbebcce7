import PostcopyTransport
import PostcopyWire

extension PageServer {
    /// Which pages of a run are all-zero (one bit each), from the RAM scan's
    /// zero pass: only the chunks of the run are waited for (`ZeroPass`).
    func zeroMap(_ z: ZeroMapRequest) throws(TransportError) -> ZeroMap {
        let table = memory.table
        guard z.pageCount >= 1, z.pageCount <= WireProtocol.maxZeroMapPages else {
            throw .protocolViolation("zero map request for \(z.pageCount) pages (1...\(WireProtocol.maxZeroMapPages) allowed)")
        }
        do {
            try table.validate(region: z.region, pageOffset: z.firstPage, pageCount: z.pageCount)
        } catch { throw .protocolViolation(error.description) }
        let global = table.firstGlobalPage[Int(z.region)] + Int(z.firstPage)
        guard waitForFreeze(), let isZero = memory.zeroBits(globalFirst: global, count: Int(z.pageCount)) else {
            throw .closed("source stopping")
        }
        stats.zeroMaps.add(1, ordering: .relaxed)
        var bits = PageBitmap(pages: Int(z.pageCount))
        for i in 0..<Int(z.pageCount) where isZero(global + i) { bits.insert(i) }
        return ZeroMap(region: z.region, firstPage: z.firstPage, pageCount: z.pageCount, bits: bits.bytes)
    }
}
