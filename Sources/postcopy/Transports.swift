import Logging
import PostcopyCore
import PostcopyHandoff
import PostcopyRDMA
import PostcopyTransport

/// Every choice the CLI makes from `--transport`, in one place: what a
/// destination connects with and what a source serves RDMA with.
enum Transports {
    /// The destination's transport to `endpoint` and why it was chosen; an error
    /// (`rdma` without a device) is reported as `error: …`, exit status 1.
    static func connect(_ kind: TransportKind, to endpoint: Endpoint, maxBatchPages: Int, authKey: [UInt8]?,
                        logger: Logger? = nil) throws -> (Transport, reason: String) {
        do {
            return try selectTransport(kind, endpoint: endpoint, maxBatchPages: maxBatchPages, authKey: authKey, logger: logger)
        } catch {
            throw fail("\(error)")
        }
    }

    /// The transport of each VMM's session at the handoff daemon: as `--transport`
    /// says, or TCP when that cannot be had.
    static func forVMMs(_ kind: TransportKind, to endpoint: Endpoint, authKey: [UInt8]?, logger: Logger) -> HandoffServer.TransportFactory {
        { batch, demandPages in
            (try? selectTransport(kind, endpoint: endpoint, maxBatchPages: batch, maxDemandPages: demandPages,
                                  authKey: authKey, logger: logger))?.0
                ?? TCPTransport(endpoint: endpoint, maxBatchPages: batch, maxDemandPages: demandPages, authKey: authKey)
        }
    }

    /// The source's RDMA listener for `--transport`: required for `rdma`, tried for
    /// `auto` (saying why it is off when it cannot be had), none for `tcp`.
    static func listenRDMA(_ kind: TransportKind, host: String, memory: MemoryMapping, file: Int32? = nil,
                           logger: Logger) throws -> RDMAServer? {
        switch kind {
        case .tcp:
            return nil
        case .rdma:
            do { return try RDMAServer(host: host, memory: memory.base, length: memory.length, file: file, logger: logger) } catch {
                throw fail("--transport rdma: \(error)")
            }
        case .auto:
            guard rdmaDeviceCount() > 0 else {
                logger.info("auto: serving TCP only (no RDMA device on this host)")
                return nil
            }
            do { return try RDMAServer(host: host, memory: memory.base, length: memory.length, file: file, logger: logger) } catch {
                logger.notice("auto: serving TCP only: \(error)")
                return nil
            }
        }
    }
}
