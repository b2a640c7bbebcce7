import CPostcopy
#if canImport(Glibc)
import Glibc
#endif

/// Scheduling for a dedicated thread. The fault path always runs `.normal`.
/// Background streaming defaults to `.normal` too: measured on 2 cores, SCHED_IDLE
/// or nice 10 background threads gave the demand path *worse* latency (an idle
/// vCPU wakes slowly, a busy one fast) and starved the stream whenever guest
/// threads kept the CPUs busy; a bounded window on a separate connection and
/// thread is what keeps demand ahead. `.low` and `.idle` remain for hosts where
/// the guest's CPU time matters more than time to full copy.
public enum ThreadPriority: String, Sendable, CaseIterable {
    case normal
    /// nice 10 (per thread).
    case low
    /// SCHED_IDLE: runs only when nothing else wants the CPU.
    case idle

    /// Applies this priority to the calling thread.
    public func applyToCurrentThread() {
        switch self {
        case .normal: break
        case .low: _ = cpc_set_thread_nice(10)
        case .idle: _ = cpc_set_sched_idle()
        }
    }
}

private final class ThreadBox {
    let name: String
    let priority: ThreadPriority
    let body: () -> Void
    init(name: String, priority: ThreadPriority, body: @escaping () -> Void) {
        self.name = name
        self.priority = priority
        self.body = body
    }
}

/// A joinable pthread. The fault path runs on these, never in Swift concurrency
/// tasks (a blocking poll inside a Task starves the cooperative pool).
public final class PThread: @unchecked Sendable {
    private var handle: pthread_t
    private var joined = false

    /// Starts `body` on a new named pthread. The closure travels as the thread
    /// argument (an Unmanaged box) with a non-capturing start routine.
    public init(name: String, priority: ThreadPriority = .normal, _ body: @escaping @Sendable () -> Void) {
        let box = Unmanaged.passRetained(ThreadBox(name: name, priority: priority, body: body))
        var t = pthread_t()
        let rc = pthread_create(&t, nil, { arg in
            let box = Unmanaged<ThreadBox>.fromOpaque(arg!).takeRetainedValue()
            _ = box.name.withCString { cpc_set_thread_name($0) }
            box.priority.applyToCurrentThread()
            box.body()
            return nil
        }, box.toOpaque())
        precondition(rc == 0, "pthread_create failed: \(rc)")
        handle = t
    }

    public func join() {
        guard !joined else { return }
        joined = true
        pthread_join(handle, nil)
    }

    deinit { if !joined { pthread_detach(handle) } }
}
