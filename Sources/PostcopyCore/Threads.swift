import CPostcopy
#if canImport(Glibc)
import Glibc
#endif

/// Scheduling for a dedicated thread. The fault path stays `.normal`; bulk work
/// (background streaming) runs `.idle` (SCHED_IDLE) so it can never delay a demand fault.
public enum ThreadPriority: Sendable {
    case normal
    case idle
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
            if box.priority == .idle { _ = cpc_set_sched_idle() }
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
