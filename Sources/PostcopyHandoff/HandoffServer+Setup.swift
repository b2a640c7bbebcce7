import Foundation
import PostcopyCore
import PostcopyDestination
import PostcopyRDMA
import PostcopyTransport
import PostcopyWire

/// A VMM's transport to the source and its engine.
extension HandoffServer {
    /// The VMM's transport to `source` (`TransportFactory`), its requests
    /// sized so that a guest page of `guestPage` bytes fits whole.
    func makeTransport(guestPage: Int, config: EngineConfig, source: Endpoint) -> Transport {
        let unitPages = max(guestPage / Int(getpagesize()), 1)
        let (transport, reason) = TransportFactory.connectOrTCP(transportKind, endpoint: source,
                                                                maxBatchPages: max(config.batchPages, unitPages),
                                                                maxDemandPages: max(64, unitPages), authKey: authKey,
                                                                encryption: encryption, logger: logger)
        logger.debug("transport: \(reason)")
        return transport
    }

    /// Joins a source session over `transport`, checks the VMM's regions
    /// against the source's, opens both channels and makes the engine. A
    /// connection lost on the way (a cut during the handshake or while the
    /// channels open) is recovered as one lost later would be: tried again,
    /// with backoff, until the recovery deadline; the VMM is refused only when
    /// that runs out, or when the source refuses or is not there.
    func makeEngine(uffd: Userfaultfd, regions: [VMMRegion], transport: Transport, config: EngineConfig,
                    storage: EngineStorage? = nil) throws -> PostcopyEngine {
        let retry = SetupRetry(deadline: config.recoveryDeadline, logger: logger)
        var recoveries: [UInt64] = []
        let info = try retry.run("the handshake", "trying again", recoveries: &recoveries,
                                 retryable: SetupRetry.handshakeRetryable) { (_) throws(TransportError) in try transport.connect() }
        let table = info.table
        let ps = UInt64(table.pageSize)
        let guest = regions.map {
            GuestRegion(base: $0.base, size: Int($0.size), sourceFirstPage: Int($0.offset / ps))
        }
        if let problem = GuestRegion.layoutProblem(guest, table: table) { throw HandoffError.layout(problem) }
        // A source that offers precopy copies RAM before its guest pauses. Over
        // RDMA the source grants READ access only once paused or once this
        // session precopies: pass 1 is asked for first (it waits for the
        // source's start), then the channels open.
        let precopied = info.welcome.capabilities.contains(.precopy) && PostcopyEngine.takesPrecopy(config, pageSize: table.pageSize)
        let firstSet = precopied && transport.name != "tcp" ? try transport.fetchDirtySet(pass: 1) : nil
        let (demand, background) = try retry.run("opening the page channels", "reconnecting", recoveries: &recoveries,
                                                  retryable: { $0.isConnectionLoss }) { (isRetry) throws(TransportError) in
            if isRetry { return try transport.reconnect() }
            return (try transport.openChannel(.demand), try transport.openChannel(.background))
        }
        if !recoveries.isEmpty { logger.info("session set-up recovered from \(recoveries.count) lost connection(s)") }
        // The source guest may still be running: the background stream waits
        // for its pause (the device state being published) and the zero map
        // (the quick first pass of the source's scan: never the digests), then
        // streams only the pages that hold data. Faults are served now.
        // A source that offers no zero map gets none asked of it: its replies
        // still flag all-zero batches.
        let t = transport
        let zeroMap = info.welcome.capabilities.contains(.zeroMap)
        var precopy: PostcopyEngine.PrecopyProvider?
        if precopied {
            precopy = { @Sendable (pass: UInt32) throws(TransportError) -> PrecopySet in
                if pass == 1, let firstSet { return firstSet }
                return try t.fetchDirtySet(pass: pass)
            }
        }
        let ready: @Sendable () throws(TransportError) -> Void = { () throws(TransportError) in _ = try t.fetchDeviceState(timeoutMs: -1) }
        let fetch: @Sendable (UInt16, UInt64, UInt64) throws(TransportError) -> ZeroMap = { (region, first, count) throws(TransportError) -> ZeroMap in
            try t.fetchZeroMap(region: region, firstPage: first, pageCount: count)
        }
        let zeroMaps = ZeroMapProvider(ready: ready, fetch: zeroMap ? fetch : nil)
        return try PostcopyEngine(uffd: uffd, regions: guest, session: info, zeroMaps: [],
                                  zeroMapProvider: zeroMaps, precopy: precopy,
                                  demand: demand, background: background,
                                  reconnect: { () throws(TransportError) in try t.reconnect() },
                                  config: config, logger: logger, storage: storage)
    }
}
