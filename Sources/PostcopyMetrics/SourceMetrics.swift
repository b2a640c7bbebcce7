import Metrics
import PostcopyCore
import PostcopySource
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// The page server's counters as swift-metrics (served by `postcopy source
/// --metrics-listen`): pages served by class, bytes on the wire, sessions,
/// reconnects, connections refused, gathers. Read from `SourceStats` twice a
/// second by a thread of its own (the serving path is not touched).
public final class SourceMetricsCollector: Sendable {
    private final class Flag: Sendable { let stop = Atomic<Bool>(false) }
    private let flag = Flag()
    private let thread = Locked<PThread?>(nil)

    public init(_ stats: SourceStats, intervalMs: Int = 500) {
        let flag = self.flag
        let counters: [(Counter, @Sendable () -> UInt64)] = [
            (Counter(label: "postcopy_source_pages_total", dimensions: [("class", "demand")]), { stats.demandPages.load(ordering: .relaxed) }),
            (Counter(label: "postcopy_source_pages_total", dimensions: [("class", "prefetch")]), { stats.prefetchPages.load(ordering: .relaxed) }),
            (Counter(label: "postcopy_source_pages_total", dimensions: [("class", "background")]), { stats.backgroundPages.load(ordering: .relaxed) }),
            (Counter(label: "postcopy_source_pages_total", dimensions: [("class", "precopy")]), { stats.precopyPages.load(ordering: .relaxed) }),
            (Counter(label: "postcopy_source_wire_bytes_total", dimensions: [("direction", "sent")]), { stats.bytesSent.load(ordering: .relaxed) }),
            (Counter(label: "postcopy_source_wire_bytes_total", dimensions: [("direction", "received")]), { stats.bytesReceived.load(ordering: .relaxed) }),
            (Counter(label: "postcopy_source_encrypted_bytes_total", dimensions: [("direction", "sent")]), { stats.bytesEncrypted.load(ordering: .relaxed) }),
            (Counter(label: "postcopy_source_sessions_completed_total"), { stats.completedSessions.load(ordering: .relaxed) }),
            (Counter(label: "postcopy_source_sessions_resumed_total"), { stats.resumedSessions.load(ordering: .relaxed) }),
            (Counter(label: "postcopy_source_connections_refused_total"), { stats.rejectedConnections.load(ordering: .relaxed) }),
            (Counter(label: "postcopy_source_gathers_total"), { stats.gathers.load(ordering: .relaxed) }),
        ]
        thread.withLock {
            $0 = PThread(name: "src-metrics", priority: .idle) {
                var cursors = [GrowthCursor](repeating: GrowthCursor(), count: counters.count)
                func update() {
                    for (i, (counter, read)) in counters.enumerated() {
                        let g = cursors[i].growth(to: read())
                        if g > 0 { counter.increment(by: Int64(g)) }
                    }
                }
                while !flag.stop.load(ordering: .relaxed) {
                    update()
                    usleep(useconds_t(intervalMs * 1000))
                }
                update()
            }
        }
    }

    /// One last update, then the thread ends.
    public func finish() {
        flag.stop.store(true, ordering: .relaxed)
        thread.withLock { $0?.join(); $0 = nil }
    }
}
