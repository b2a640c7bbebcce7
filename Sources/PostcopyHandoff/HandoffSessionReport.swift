import PostcopyCore

/// What one VMM session did, reported when it ends.
public struct HandoffSessionReport: Sendable, Codable {
    public var vmmPid: Int32
    /// The transport pages moved over ("tcp", "rdma", "rdma→tcp" after a failover).
    public var transport: String
    public var regions: Int
    public var guestBytes: Int
    public var completed: Bool
    public var error: String?
    public var faults: UInt64
    public var demandPages: UInt64
    public var backgroundPages: UInt64
    public var zeroPagesFaulted: UInt64
    /// Zero pages mapped before the guest touched them.
    public var zeroPagesMappedAhead: UInt64 = 0
    public var removeEvents: UInt64
    public var timeToFullCopySeconds: Double?
    public var faultLatency: LatencySummary
    /// [percentile, ns] points of the fault-latency CDF.
    public var faultLatencyCDF: [[Double]]
    /// Total time the guest's threads waited on faults (blocktime summed over vCPUs).
    public var stallSeconds: Double
    public var zeroPages: Int
    public var bytesSent: UInt64
    public var bytesReceived: UInt64
    /// Whether the stream from the source was encrypted, and the frame bytes decrypted.
    public var encrypted = false
    public var bytesDecrypted: UInt64 = 0
    /// CPU time of the daemon process while this session ran.
    public var cpuSeconds: Double
    /// CPU time of the daemon from the engine's start (after preallocation,
    /// before the pause) until every page was in: the postcopy window's cost.
    public var cpuSecondsToFullCopy: Double?
    /// Pages present over time: [CLOCK_MONOTONIC ns, demand pages, background pages, settled pages].
    public var progress: [[UInt64]]
    /// "copy" (anonymous memory, UFFDIO_COPY) or "continue" (shared memory
    /// written through the daemon's alias, UFFDIO_CONTINUE).
    public var installPath: String = "copy"
    /// Allocating the guest's memory through the alias, before the engine
    /// started (continue only; 0 on the copy path).
    public var preallocationSeconds: Double = 0
    /// Pages each install path put in place (the other one's stays 0).
    public var pagesCopied: UInt64 = 0
    public var pagesContinued: UInt64 = 0
    /// Pages whose bytes were received straight into the alias (continue path).
    public var pagesReceivedInPlace: UInt64 = 0
    /// Streamed pages held unmapped, and those settled by their block leaving
    /// the userfaultfd (never CONTINUEd: `LazyStreamMapping.swift`).
    public var streamedPagesHeld: UInt64 = 0
    public var streamedPagesReleased: UInt64 = 0
    /// Pages a REMOVE hit while their fetch was in flight.
    public var removedInFlight: UInt64 = 0
    /// Precopy (hybrid): passes, pages received in them, pages the final dirty
    /// set invalidated, clean pages mapped without a transfer (ahead / on a
    /// fault), faults that waited for the final set, and when it was applied
    /// (CLOCK_MONOTONIC ns; 0: no precopy).
    public var precopyPasses: UInt64 = 0
    public var precopyPages: UInt64 = 0
    public var precopyStalePages: UInt64 = 0
    public var cleanPagesMapped: UInt64 = 0
    public var cleanPagesReleased: UInt64 = 0
    public var cleanPageFaults: UInt64 = 0
    public var faultsParkedOnFinalSet: UInt64 = 0
    public var finalSetAppliedAtNs: UInt64 = 0
    public var finalSetReceivedAtNs: UInt64 = 0
    /// When the engine started serving (its threads), on the host's monotonic clock.
    public var engineStartedAtNs: UInt64 = 0
    /// Prefetch: the mode, pages requested and received as prefetch, those a
    /// later fault showed used, and those of them a fault waited on in flight.
    public var prefetch: String = "off"
    public var prefetchRequestedPages: UInt64 = 0
    public var prefetchPages: UInt64 = 0
    public var prefetchHits: UInt64 = 0
    public var prefetchLateHits: UInt64 = 0
    public var prefetchPagesOnDemandChannel: UInt64 = 0
    /// Service latency of the faults answered by a demand request only.
    public var demandRequestLatency: LatencySummary?
    /// Working set: pages recorded and written (nil: not recording), pages
    /// requested by a replay, and why a replayed one was refused.
    public var workingSetRecordedPages: Int?
    public var replayPages: UInt64 = 0
    /// When the replay's last request left (CLOCK_MONOTONIC ns; 0: none).
    public var replayRequestedAtNs: UInt64 = 0
    public var workingSetRefused: String?
    /// The daemon's resident memory outside guest memory (its aliases of the
    /// VMMs' memory files left out): the highest sample during this session,
    /// and the level when the daemon started (every session of the process).
    public var rssOutsideGuestMaxBytes: Int = 0
    public var rssOutsideGuestIdleBytes: Int = 0

    enum CodingKeys: String, CodingKey {
        case vmmPid = "vmm_pid", transport, regions, guestBytes = "guest_bytes", completed, error, faults
        case demandPages = "demand_pages", backgroundPages = "background_pages", zeroPagesFaulted = "zero_pages_faulted"
        case zeroPagesMappedAhead = "zero_pages_mapped_ahead"
        case removeEvents = "remove_events", timeToFullCopySeconds = "time_to_full_copy_seconds", faultLatency = "fault_latency"
        case faultLatencyCDF = "fault_latency_cdf", stallSeconds = "stall_seconds", zeroPages = "zero_pages"
        case bytesSent = "bytes_sent", bytesReceived = "bytes_received", encrypted, bytesDecrypted = "bytes_decrypted", cpuSeconds = "cpu_seconds", cpuSecondsToFullCopy = "cpu_seconds_to_full_copy", progress
        case installPath = "install_path", preallocationSeconds = "preallocation_seconds"
        case pagesCopied = "pages_copied", pagesContinued = "pages_continued", pagesReceivedInPlace = "pages_received_in_place", removedInFlight = "removed_in_flight"
        case streamedPagesHeld = "streamed_pages_held", streamedPagesReleased = "streamed_pages_released"
        case precopyPasses = "precopy_passes", precopyPages = "precopy_pages", precopyStalePages = "precopy_stale_pages"
        case cleanPagesMapped = "clean_pages_mapped", cleanPagesReleased = "clean_pages_released", cleanPageFaults = "clean_page_faults"
        case faultsParkedOnFinalSet = "faults_parked_on_final_set", finalSetAppliedAtNs = "final_set_applied_at_ns", finalSetReceivedAtNs = "final_set_received_at_ns", engineStartedAtNs = "engine_started_at_ns"
        case prefetch, prefetchRequestedPages = "prefetch_requested_pages", prefetchPages = "prefetch_pages"
        case prefetchHits = "prefetch_hits", prefetchLateHits = "prefetch_late_hits", prefetchPagesOnDemandChannel = "prefetch_pages_on_demand_channel", demandRequestLatency = "demand_request_latency"
        case workingSetRecordedPages = "working_set_recorded_pages", replayPages = "replay_pages", replayRequestedAtNs = "replay_requested_at_ns", workingSetRefused = "working_set_refused"
        case rssOutsideGuestMaxBytes = "rss_outside_guest_max_bytes", rssOutsideGuestIdleBytes = "rss_outside_guest_idle_bytes"
    }
}
