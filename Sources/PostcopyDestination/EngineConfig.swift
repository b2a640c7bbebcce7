import PostcopyCore

/// Scheduling knobs of the engine.
public struct EngineConfig: Sendable {
    /// Stream pages the guest has not asked for (off: demand only, for benchmarks).
    public var background = true
    /// Pages per background request.
    public var batchPages = 128
    /// Background requests kept in flight at most (bounds what a demand reply can
    /// wait behind in the kernel and what the background installer holds); nil:
    /// what the background channel suggests (RDMA: 16), else 4.
    public var window: Int? = nil
    /// Background bytes per second at most (0: as fast as the window allows).
    public var backgroundRate: Int = 0
    /// Seconds to keep reconnecting after the connection to the source breaks
    /// (guest threads stay parked meanwhile); 0 fails at the first break.
    public var recoveryDeadline: Double = 60
    /// Seconds without any reply while requests are in flight after which the
    /// connection counts as broken (a source that hangs, a reply lost): the
    /// engine reconnects and re-sends them. 0: wait forever.
    public var stallTimeout: Double = 20
    /// Told of each fault served and each reconnect (metrics); nil: nobody.
    public var observer: EngineObserver? = nil
    /// Scheduling of the background thread (see `ThreadPriority` for why normal is the default).
    public var backgroundPriority: ThreadPriority = .normal
    /// Page size of the guest memory the uffd serves: the source's page size, or
    /// 2 MiB for hugetlbfs-backed VMM memory (installed 2 MiB at a time: one
    /// fault fetches the 512 source pages of its huge page).
    public var guestPageSize: Int = 0
    /// How pages reach the guest (`UFFDIO_COPY`, or written through an alias and
    /// mapped with `UFFDIO_CONTINUE`).
    public var installPath: InstallPath = .copy
    /// On the continue path, receive replies' payloads straight into the alias
    /// (`InPlaceReceive.swift`) instead of into the channel's buffer and then
    /// copying them there. On by default; off only to measure the difference.
    public var receiveInPlace = true
    /// Demand replies too (one page each), not only the background stream's.
    public var receiveDemandInPlace = true
    /// Map the pages the zero map says are zero while the stream runs, before
    /// the guest touches them (`installZeroPagesAhead`), instead of at their
    /// first fault. No memory cost: UFFDIO_ZEROPAGE maps the shared zero page,
    /// and the continue path's alias is allocated already.
    public var installZeroPagesAhead = true
    /// Continue path, pure postcopy, 4 KiB guest pages: the background
    /// stream's pages are left unmapped in the alias when no guest waits on
    /// them, and blocks whose every page is in leave the userfaultfd (the
    /// guest's own minor faults map them) instead of one UFFDIO_CONTINUE per
    /// page here (`LazyStreamMapping.swift`).
    public var mapStreamLazily = true
    /// Copy pages in precopy passes while the source guest still runs, when
    /// the source offers it (`Capabilities.precopy`): continue path only
    /// (the pages wait unmapped in the alias for the final dirty set), 4 KiB
    /// guest pages, TCP.
    public var precopy = true
    /// Record the working set (the pages faulted on in this many seconds after
    /// the first fault; 0: off). The background stream holds off meanwhile, so
    /// that the record holds every page the guest touched in that time.
    public var recordWorkingSetSeconds: Double = 0
    /// A working set to fetch first, before the rest of the stream (checked:
    /// `WorkingSet`). Refused, with the migration going on without it, when
    /// it does not fit this memory.
    public var replayWorkingSet: WorkingSet? = nil
    /// Fetch ahead of the faults (`PrefetchMode`).
    public var prefetch: PrefetchMode = .adaptive
    /// Tests only (0 otherwise): the fault thread waits this long before it
    /// sends the demand requests of a batch, widening the window in which a
    /// page is claimed for a fetch but its request is not in flight yet.
    public var testDelayBeforeDemandMicroseconds: UInt32 = 0
    public init() {}
}
