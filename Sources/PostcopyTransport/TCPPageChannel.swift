import PostcopyWire

/// A page channel on one TCP connection: requests out, page frames in.
final class TCPPageChannel: PageChannel, @unchecked Sendable {
    let connection: TCPConnection
    let table: RegionTable

    let canGather: Bool
    let canGatherPrecopy: Bool

    init(connection: TCPConnection, table: RegionTable, capabilities: Capabilities) {
        self.connection = connection
        self.table = table
        canGather = capabilities.contains(.gather)
        canGatherPrecopy = canGather && capabilities.contains(.precopyGather)
    }

    var pollDescriptor: Int32 { connection.fd.raw }
    var bytesSent: UInt64 { connection.bytesSent }
    var bytesReceived: UInt64 { connection.bytesReceived }

    func setPlacement(_ placement: PagePlacement?) { connection.placement = placement }

    func submit(_ request: PageRequest) throws(TransportError) {
        try connection.send(.pageRequest(request))
    }

    func submit(batch requests: [PageRequest]) throws(TransportError) {
        try connection.send(requests.map { .pageRequest($0) })
    }

    func submit(gather requests: [PageRequest]) throws(TransportError) {
        guard canGather, requests.count > 1, let g = GatherRequest(requests) else { return try submit(batch: requests) }
        try connection.send(.gatherRequest(g))
    }

    /// Each page reply, and each run of a gather reply, as one completion.
    func drainCompletions(_ body: (PageDataHeader, UnsafeRawBufferPointer) throws(TransportError) -> Void) throws(TransportError) -> Int {
        var n = 0
        while let m = try n == 0 ? connection.tryReceive() : connection.tryReceiveMore() {
            switch m {
            case .pageData(let h, let payload):
                try deliver(h, payload, body)
                n += 1
            case .gatherData(let g, let payload):
                let placed = connection.gatherPlacement
                var at = 0, segment = 0
                for i in g.runs.indices {
                    let h = g.header(i)
                    var part = UnsafeRawBufferPointer(start: nil, count: 0)
                    if !h.isZero, let placed {
                        part = placed[segment]
                        segment += 1
                    } else if !h.isZero {
                        let bytes = Int(h.pageCount) * (connection.pageSize ?? 0)
                        part = UnsafeRawBufferPointer(rebasing: payload[at..<(at + bytes)])
                        at += bytes
                    }
                    try deliver(h, part, body)
                    n += 1
                }
            default:
                throw .protocolViolation("expected page data, got \(m.type)")
            }
        }
        return n
    }

    private func deliver(_ h: PageDataHeader, _ payload: UnsafeRawBufferPointer,
                         _ body: (PageDataHeader, UnsafeRawBufferPointer) throws(TransportError) -> Void) throws(TransportError) {
        do {
            try table.validate(region: h.region, pageOffset: h.pageOffset, pageCount: UInt64(h.pageCount))
        } catch { throw .wire(error) }
        try body(h, payload)
    }
}
