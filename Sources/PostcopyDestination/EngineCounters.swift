import Synchronization

/// Live counters, readable from another thread (progress bar).
public final class EngineCounters: Sendable {
    public let faults = Atomic<UInt64>(0)
    /// Faults that came as async "page not present" requests (a subset of `faults`).
    public let apfFaults = Atomic<UInt64>(0)
    /// "Page ready" answers posted to guest tasks parked by async page faults.
    public let apfReady = Atomic<UInt64>(0)
    public let faultsCoalesced = Atomic<UInt64>(0)
    public let demandPages = Atomic<UInt64>(0)
    /// Prefetch (`PrefetchMode.adaptive`): pages requested, pages received,
    /// prefetched pages shown used by later faults (walked past along the
    /// trend, or waited on in flight), and those waited on in flight.
    public let prefetchRequestedPages = Atomic<UInt64>(0)
    public let prefetchPages = Atomic<UInt64>(0)
    public let prefetchHits = Atomic<UInt64>(0)
    public let prefetchLateHits = Atomic<UInt64>(0)
    /// Prefetched pages requested on the demand channel (none while a
    /// background stream that gathers runs: they ride its connection).
    public let prefetchPagesOnDemandChannel = Atomic<UInt64>(0)
    /// Pages requested by a working-set replay.
    public let replayPages = Atomic<UInt64>(0)
    /// When the last replay request had left (CLOCK_MONOTONIC ns; 0: not yet, or no replay).
    public let replayRequestedAt = Atomic<UInt64>(0)
    public let backgroundPages = Atomic<UInt64>(0)
    public let zeroFaults = Atomic<UInt64>(0)
    public let settledPages = Atomic<Int>(0)
    public let eexist = Atomic<UInt64>(0)
    public let eagain = Atomic<UInt64>(0)
    public let removedRanges = Atomic<UInt64>(0)
    /// Pages removed while a fetch for them was in flight (their reply is dropped,
    /// or, on the continue path, zeroed once it has landed).
    public let removedInFlight = Atomic<UInt64>(0)
    /// Pages the zero map says are zero (never transferred).
    public let zeroPagesKnown = Atomic<Int>(0)
    /// Pages the source flagged as zero in a reply (no payload sent).
    public let zeroPagesReceived = Atomic<UInt64>(0)
    /// Zero pages mapped before any fault on them (`EngineConfig.installZeroPagesAhead`).
    public let zeroPagesAhead = Atomic<UInt64>(0)
    /// Pages installed with UFFDIO_COPY / ZEROPAGE (copy path) and with
    /// UFFDIO_CONTINUE (continue path): each install path counts its own.
    public let pagesCopied = Atomic<UInt64>(0)
    public let pagesContinued = Atomic<UInt64>(0)
    /// Pages whose payload was received straight into the alias (continue path).
    public let pagesReceivedInPlace = Atomic<UInt64>(0)
    /// Precopy: passes done, pages received in them (a page each time it was
    /// sent), pages the final dirty set invalidated, pages mapped from the
    /// alias without a transfer (ahead, or on a fault), and faults that waited
    /// for the final dirty set.
    public let precopyPasses = Atomic<UInt64>(0)
    public let precopyPages = Atomic<UInt64>(0)
    public let precopyStalePages = Atomic<UInt64>(0)
    public let cleanPagesMapped = Atomic<UInt64>(0)
    /// Clean pages handed to the guest's own page faults (unregistered).
    public let cleanPagesReleased = Atomic<UInt64>(0)
    public let cleanPageFaults = Atomic<UInt64>(0)
    /// Streamed pages held unmapped in the alias, and those of them handed to
    /// the guest's own page faults by unregistering their block
    /// (`LazyStreamMapping.swift`; the rest were mapped on a fault, or at the end).
    public let streamedPagesHeld = Atomic<UInt64>(0)
    public let streamedPagesReleased = Atomic<UInt64>(0)
    public let faultsParkedOnFinalSet = Atomic<UInt64>(0)
    /// When the final dirty set arrived and when it was applied, clean runs
    /// released (0: not yet or no precopy).
    public let finalSetReceivedAt = Atomic<UInt64>(0)
    public let finalSetAppliedAt = Atomic<UInt64>(0)
}
