import Logging
import PostcopyCore
import PostcopyTransport

/// The one place that turns `--transport tcp | rdma | auto` into transports, on
/// both sides, and says which one it picked and why:
/// - `.tcp`: TCP only;
/// - `.rdma`: RDMA, or a clear error when it cannot work here;
/// - `.auto`: RDMA when this host has an RDMA device (and, at the destination,
///   the source offers RDMA over a route to it), else TCP; but TCP whenever the
///   stream is encrypted (a key and `--encryption on`, the default): one-sided
///   RDMA READ cannot encrypt pages, and `auto` never trades confidentiality
///   for speed on its own (`--transport rdma` does, and says so).
public enum TransportFactory {
    /// The destination's transport to the source at `endpoint`, and the reason
    /// for the choice.
    public static func connect(_ kind: TransportKind, endpoint: Endpoint, maxBatchPages: Int, maxDemandPages: Int = 64,
                               authKey: [UInt8]? = nil, encryption: StreamEncryption = .on,
                               logger: Logger? = nil) throws(TransportError) -> (Transport, reason: String) {
        func tcp() -> TCPTransport {
            tcpTransport(endpoint, maxBatchPages: maxBatchPages, maxDemandPages: maxDemandPages, authKey: authKey, encryption: encryption)
        }
        let encrypted = encryption.applies(withKey: authKey)
        switch kind {
        case .tcp:
            return (tcp(), "tcp requested")
        case .rdma:
            guard rdmaDeviceCount() > 0 else {
                throw .unavailable("no RDMA device on this host (ibv_get_device_list found none; for soft-RoCE: rdma link add rxe0 type rxe netdev IFACE); use --transport tcp or auto")
            }
            if encrypted {
                logger?.warning("--transport rdma with encryption on: the control connection is encrypted, but pages READ over RDMA cross the fabric in clear (one-sided READ cannot be encrypted); use --transport tcp for encrypted pages")
            }
            return (RDMATransport(endpoint: endpoint, maxBatchPages: maxBatchPages, maxDemandPages: maxDemandPages, authKey: authKey,
                                  encryption: encryption, logger: logger),
                    encrypted ? "rdma requested (pages in clear on the fabric; control encrypted)" : "rdma requested")
        case .auto:
            let n = rdmaDeviceCount()
            guard n > 0 else { return (tcp(), "auto: no RDMA device on this host, using TCP") }
            if encrypted {
                return (tcp(), "auto: the stream is encrypted and RDMA READ cannot encrypt pages, using TCP (--transport rdma or --encryption off allow RDMA)")
            }
            return (RDMATransport(endpoint: endpoint, maxBatchPages: maxBatchPages, maxDemandPages: maxDemandPages, authKey: authKey,
                                  encryption: encryption, fallBackToTCP: true, logger: logger),
                    "auto: \(n) RDMA device(s) here; RDMA if the source offers it over a route to \(endpoint.host), else TCP")
        }
    }

    /// Like `connect`, but never fails: when `kind` cannot be had here, TCP
    /// (for a daemon that checked `kind` once at start and must serve every VMM).
    public static func connectOrTCP(_ kind: TransportKind, endpoint: Endpoint, maxBatchPages: Int, maxDemandPages: Int = 64,
                                    authKey: [UInt8]? = nil, encryption: StreamEncryption = .on,
                                    logger: Logger? = nil) -> (Transport, reason: String) {
        do {
            return try connect(kind, endpoint: endpoint, maxBatchPages: maxBatchPages, maxDemandPages: maxDemandPages,
                               authKey: authKey, encryption: encryption, logger: logger)
        } catch {
            return (tcpTransport(endpoint, maxBatchPages: maxBatchPages, maxDemandPages: maxDemandPages, authKey: authKey, encryption: encryption),
                    "\(kind.rawValue): \(error); using TCP")
        }
    }

    private static func tcpTransport(_ endpoint: Endpoint, maxBatchPages: Int, maxDemandPages: Int, authKey: [UInt8]?,
                                     encryption: StreamEncryption) -> TCPTransport {
        TCPTransport(endpoint: endpoint, maxBatchPages: maxBatchPages, maxDemandPages: maxDemandPages, authKey: authKey, encryption: encryption)
    }

    /// The source's remote-read provider for `kind`: an `RDMAServer` listening
    /// on `host` with `memory` registered for remote READ (required for `.rdma`,
    /// tried for `.auto`), or nil (page replies over TCP only), and the reason.
    /// `file`: the descriptor `memory` is mapped from, when that mapping is read-only.
    /// Logs the choice when it is not the one asked for.
    public static func serve(_ kind: TransportKind, host: String, memory: MemoryMapping, file: Int32? = nil,
                             logger: Logger) throws(TransportError) -> (provider: (any RemoteReadProvider)?, reason: String) {
        func rdma() throws(TransportError) -> RDMAServer {
            try RDMAServer(host: host, memory: memory.base, length: memory.length, file: file, logger: logger)
        }
        switch kind {
        case .tcp:
            return (nil, "tcp requested: serving TCP only")
        case .rdma:
            return (try rdma(), "rdma requested")
        case .auto:
            guard rdmaDeviceCount() > 0 else {
                let why = "auto: serving TCP only (no RDMA device on this host)"
                logger.info("\(why)")
                return (nil, why)
            }
            do {
                return (try rdma(), "auto: RDMA device found, serving RDMA READ and TCP")
            } catch {
                let why = "auto: serving TCP only: \(error)"
                logger.notice("\(why)")
                return (nil, why)
            }
        }
    }
}
