import Metrics
import PostcopyCore
import PostcopyDestination
import PostcopyTransport
import Synchronization

/// What the handoff daemon shows an operator, through swift-metrics (served by
/// `postcopy dest --metrics-listen`): sessions, pages by class, bytes on the
/// wire, fault service times, reconnects and their duration, APF, and its own
/// memory. Totals over every VMM the daemon served; no per-VMM labels (the
/// journal and the per-session JSON report carry those).
final class HandoffMetrics: Sendable {
    let sessionsActive = Gauge(label: "postcopy_sessions_active")
    private let active = Atomic<Int>(0)
    let sessionsCompleted = Counter(label: "postcopy_sessions_completed_total")
    let sessionsFailed = Counter(label: "postcopy_sessions_failed_total")
    let handoffsRefused = Counter(label: "postcopy_handoffs_refused_total")
    let pagesDemand = Counter(label: "postcopy_pages_total", dimensions: [("class", "demand")])
    let pagesPrefetch = Counter(label: "postcopy_pages_total", dimensions: [("class", "prefetch")])
    let pagesBackground = Counter(label: "postcopy_pages_total", dimensions: [("class", "background")])
    let pagesZero = Counter(label: "postcopy_pages_total", dimensions: [("class", "zero")])
    let bytesReceived = Counter(label: "postcopy_wire_bytes_total", dimensions: [("direction", "received")])
    let bytesSent = Counter(label: "postcopy_wire_bytes_total", dimensions: [("direction", "sent")])
    /// Frame bytes through AES-256-GCM (0 while nothing is encrypted).
    let bytesDecrypted = Counter(label: "postcopy_encrypted_bytes_total", dimensions: [("direction", "received")])
    let bytesEncrypted = Counter(label: "postcopy_encrypted_bytes_total", dimensions: [("direction", "sent")])
    let faultLatency = Metrics.Timer(label: "postcopy_fault_service_seconds")
    let reconnects = Counter(label: "postcopy_reconnects_total")
    let recoveryTime = Metrics.Timer(label: "postcopy_recovery_seconds")
    let apfNotPresent = Counter(label: "postcopy_apf_events_total", dimensions: [("kind", "not_present")])
    let apfReady = Counter(label: "postcopy_apf_events_total", dimensions: [("kind", "ready")])
    let residentOutsideGuest = Gauge(label: "postcopy_resident_memory_outside_guest_bytes")

    func sessionStarted() { sessionsActive.record(active.add(1, ordering: .relaxed).newValue) }
    /// Returns the sessions still active.
    @discardableResult func sessionEnded(completed: Bool) -> Int {
        let left = active.subtract(1, ordering: .relaxed).newValue
        sessionsActive.record(left)
        if completed { sessionsCompleted.increment() } else { sessionsFailed.increment() }
        return left
    }

    /// The engine's hooks for what happens one at a time (each fault served,
    /// each reconnect).
    var observer: EngineObserver {
        EngineObserver(faultServed: { [faultLatency] ns in faultLatency.recordNanoseconds(Int64(ns)) },
                       recovered: { [reconnects, recoveryTime] ns in
                           reconnects.increment()
                           recoveryTime.recordNanoseconds(Int64(ns))
                       })
    }
}

/// One session's counters as last reported, so that each update adds what
/// changed since (the engine's counters only grow).
struct HandoffMetricsCursor {
    var demand = GrowthCursor(), prefetch = GrowthCursor(), background = GrowthCursor(), zero = GrowthCursor()
    var received = GrowthCursor(), sent = GrowthCursor(), decrypted = GrowthCursor(), encrypted = GrowthCursor()
    var apfNotPresent = GrowthCursor(), apfReady = GrowthCursor()

    mutating func update(_ m: HandoffMetrics, engine: PostcopyEngine, transport: Transport) {
        let c = engine.counters
        func add(_ counter: Counter, _ cursor: inout GrowthCursor, _ now: UInt64) {
            let g = cursor.growth(to: now)
            if g > 0 { counter.increment(by: Int64(g)) }
        }
        add(m.pagesDemand, &demand, c.demandPages.load(ordering: .relaxed))
        add(m.pagesPrefetch, &prefetch, c.prefetchPages.load(ordering: .relaxed))
        add(m.pagesBackground, &background, c.backgroundPages.load(ordering: .relaxed))
        add(m.pagesZero, &zero, c.zeroFaults.load(ordering: .relaxed) + c.zeroPagesAhead.load(ordering: .relaxed))
        let wire = transport.bytesOnWire
        add(m.bytesReceived, &received, wire.received)
        add(m.bytesSent, &sent, wire.sent)
        let cipher = transport.bytesThroughCipher
        add(m.bytesDecrypted, &decrypted, cipher.decrypted)
        add(m.bytesEncrypted, &encrypted, cipher.encrypted)
        add(m.apfNotPresent, &apfNotPresent, c.apfFaults.load(ordering: .relaxed))
        add(m.apfReady, &apfReady, c.apfReady.load(ordering: .relaxed))
    }
}
