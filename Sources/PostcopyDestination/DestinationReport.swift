import PostcopyCore
import PostcopyTransport

/// Everything a run measured. Field names are the stable `--json` schema.
public struct DestinationReport: Sendable, Codable {
    public var transport: String
    public var transportReason: String
    public var sessionID: UInt64
    public var pageSize: Int
    public var guestBytes: Int
    public var totalPages: Int
    public var zeroPages: Int
    public var nonZeroPages: Int
    public var demandPages: UInt64
    public var backgroundPages: UInt64
    /// Pages received as prefetch (`PrefetchMode.adaptive`), and those a later
    /// fault showed used.
    public var prefetchPages: UInt64 = 0
    public var prefetchHits: UInt64 = 0
    /// Of them, pages requested on the demand channel (`EngineCounters`).
    public var prefetchPagesOnDemandChannel: UInt64 = 0
    public var zeroPagesFaulted: UInt64
    /// Zero pages mapped before the guest touched them.
    public var zeroPagesMappedAhead: UInt64 = 0
    public var faults: UInt64
    public var faultsCoalesced: UInt64
    public var eexist: UInt64
    public var eagain: UInt64
    public var bytesSent: UInt64
    public var bytesReceived: UInt64
    /// Whether the stream was encrypted, and the frame bytes decrypted.
    public var encrypted = false
    public var bytesDecrypted: UInt64 = 0
    /// bytes received / (non-zero pages × page size).
    public var wireOverhead: Double
    /// From the start to the stream's start, preallocation included.
    public var handshakeSeconds: Double
    /// `InstallMode`: copy or continue.
    public var installPath: String
    /// Allocating guest RAM through the alias before the stream (continue; 0 for copy).
    public var preallocationSeconds: Double
    /// Pages each install path put in place, and those received straight into the alias.
    public var pagesCopied: UInt64 = 0
    /// CPU time of this process from the engine's start (preallocation done)
    /// to the full copy: the postcopy window's cost (guest stand-in threads included).
    public var cpuSecondsToFullCopy: Double = 0
    public var pagesContinued: UInt64 = 0
    public var pagesReceivedInPlace: UInt64 = 0
    /// Streamed pages held unmapped, and those settled by their block leaving
    /// the userfaultfd (never CONTINUEd here: `LazyStreamMapping.swift`).
    public var streamedPagesHeld: UInt64 = 0
    public var streamedPagesReleased: UInt64 = 0
    public var timeToFullCopySeconds: Double
    public var digestSeconds: Double
    public var totalSeconds: Double
    public var faultLatency: LatencySummary
    public var guestTouchLatency: LatencySummary
    public var touchedPages: Int
    public var deviceStateBytes: Int
    public var sourceDigest: String
    public var destinationDigest: String
    public var digestMatch: Bool
    public var sourceConfirmedDigest: Bool
    public var pagesSentTwice: UInt64
    public var rssOutsideGuestMaxBytes: Int
    public var cpuSeconds: Double
    public var uffdOrigin: String
    /// How long each reconnect after a broken connection took (empty: none).
    public var recoveryNs: [UInt64]
    /// With `--verify-against`: bytes compared with the memory file, and the
    /// first offset that differs (nil: every byte equal).
    public var verifiedBytes: Int? = nil
    public var firstDifferentByte: Int? = nil

    enum CodingKeys: String, CodingKey {
        case transport, transportReason = "transport_reason", sessionID = "session_id", pageSize = "page_size"
        case guestBytes = "guest_bytes", totalPages = "total_pages", zeroPages = "zero_pages", nonZeroPages = "non_zero_pages"
        case prefetchPages = "prefetch_pages", prefetchHits = "prefetch_hits", prefetchPagesOnDemandChannel = "prefetch_pages_on_demand_channel"
        case demandPages = "demand_pages", backgroundPages = "background_pages", zeroPagesFaulted = "zero_pages_faulted", zeroPagesMappedAhead = "zero_pages_mapped_ahead"
        case faults, faultsCoalesced = "faults_coalesced", eexist, eagain
        case bytesSent = "bytes_sent", bytesReceived = "bytes_received", wireOverhead = "wire_overhead", encrypted, bytesDecrypted = "bytes_decrypted"
        case handshakeSeconds = "handshake_seconds", installPath = "install_path", preallocationSeconds = "preallocation_seconds"
        case cpuSecondsToFullCopy = "cpu_seconds_to_full_copy"
        case pagesCopied = "pages_copied", pagesContinued = "pages_continued", pagesReceivedInPlace = "pages_received_in_place"
        case streamedPagesHeld = "streamed_pages_held", streamedPagesReleased = "streamed_pages_released"
        case timeToFullCopySeconds = "time_to_full_copy_seconds"
        case digestSeconds = "digest_seconds", totalSeconds = "total_seconds"
        case faultLatency = "fault_latency", guestTouchLatency = "guest_touch_latency", touchedPages = "touched_pages"
        case deviceStateBytes = "device_state_bytes", sourceDigest = "source_digest", destinationDigest = "destination_digest"
        case digestMatch = "digest_match", sourceConfirmedDigest = "source_confirmed_digest", pagesSentTwice = "pages_sent_twice"
        case rssOutsideGuestMaxBytes = "rss_outside_guest_max_bytes", cpuSeconds = "cpu_seconds", uffdOrigin = "uffd_origin"
        case recoveryNs = "recovery_ns", verifiedBytes = "verified_bytes", firstDifferentByte = "first_different_byte"
    }
}

public enum DestinationError: Error, CustomStringConvertible {
    case system(SystemError)
    case transport(TransportError)
    case incompatible(String)

    public var description: String {
        switch self {
        case .system(let e): return e.description
        case .transport(let e): return e.description
        case .incompatible(let s): return s
        }
    }
}
