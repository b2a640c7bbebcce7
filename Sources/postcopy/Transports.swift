import Logging
import PostcopyCore
import PostcopyRDMA
import PostcopyTransport

/// Every choice the CLI makes from `--transport`, in one place: what a
/// destination connects with and what a source serves RDMA with (both through
/// `TransportFactory`, which the handoff daemon uses too).
enum Transports {
    /// The destination's transport to `endpoint` and why it was chosen; an error
    /// (`rdma` without a device) is reported as `error: …`, exit status 1.
    static func connect(_ kind: TransportKind, to endpoint: Endpoint, maxBatchPages: Int, authKey: [UInt8]?,
                        encryption: StreamEncryption = .on, logger: Logger? = nil) throws -> (Transport, reason: String) {
        do {
            return try TransportFactory.connect(kind, endpoint: endpoint, maxBatchPages: maxBatchPages, authKey: authKey,
                                                encryption: encryption, logger: logger)
        } catch {
            throw fail("\(error)")
        }
    }

    /// The source's remote-read provider (RDMA READ) for `--transport`: required
    /// for `rdma`, tried for `auto` (saying why it is off when it cannot be had),
    /// none for `tcp`.
    static func listenRDMA(_ kind: TransportKind, host: String, memory: MemoryMapping, file: Int32? = nil,
                           logger: Logger) throws -> (any RemoteReadProvider)? {
        do { return try TransportFactory.serve(kind, host: host, memory: memory, file: file, logger: logger).provider } catch {
            throw fail("--transport rdma: \(error)")
        }
    }
}
