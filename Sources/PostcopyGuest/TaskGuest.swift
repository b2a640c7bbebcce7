import CGuestAPF
import CPostcopy
import PostcopyCore
#if canImport(Glibc)
import Glibc
#endif

/// A guest of cooperative tasks on vCPU threads (the guest-side APF library's
/// scheduler): each task reads random words of random pages. With an APF
/// channel, a task that touches a missing page parks on its token and the
/// vCPU runs another task; without one (the blocking guest), the fault stops
/// the whole vCPU thread in the kernel.
public final class TaskGuest: @unchecked Sendable {
    public let vcpus: Int
    public let tasksPerVCPU: Int
    private let channel: APFGuestChannel?
    private let taskStats: UnsafeMutablePointer<apf_task_stats>
    private let vcpuStats: UnsafeMutablePointer<apf_vcpu_stats>
    private let stopFlag: UnsafeMutablePointer<Int32>
    private let args: UnsafeMutablePointer<apf_random_args>
    private var threads: [PThread] = []
    private let base: UnsafeMutableRawPointer
    private let pages: Int
    /// The page size of the guest's memory (the unit tasks read and touch in).
    public let pageSize: Int
    public static let stackBytes = 256 << 10

    /// A guest over `bytes` at `base`, made of `pageSize` pages (by default the
    /// host's: an anonymous mapping's).
    public init(base: UnsafeMutableRawPointer, bytes: Int, vcpus: Int, tasksPerVCPU: Int, think: UInt32, seed: UInt64,
                channel: APFGuestChannel?, pageSize: Int = MemoryMapping.systemPageSize) {
        self.vcpus = vcpus
        self.tasksPerVCPU = tasksPerVCPU
        self.channel = channel
        self.base = base
        self.pageSize = pageSize
        pages = bytes / pageSize
        let n = vcpus * tasksPerVCPU
        taskStats = .allocate(capacity: n)
        taskStats.initialize(repeating: apf_task_stats(), count: n)
        vcpuStats = .allocate(capacity: vcpus)
        vcpuStats.initialize(repeating: apf_vcpu_stats(), count: vcpus)
        stopFlag = .allocate(capacity: 1)
        stopFlag.initialize(to: 0)
        args = .allocate(capacity: vcpus)
        for v in 0..<vcpus {
            (args + v).initialize(to: apf_random_args(base: UnsafePointer(base.assumingMemoryBound(to: UInt8.self)), pages: UInt64(pages),
                                                      page_size: UInt64(pageSize), seed: seed &+ UInt64(v) &* 0x9E37_79B9, think: think,
                                                      stop: stopFlag, stats: taskStats + v * tasksPerVCPU, checksum: 0))
        }
    }

    deinit {
        taskStats.deallocate()
        vcpuStats.deallocate()
        stopFlag.deallocate()
        args.deallocate()
    }

    /// A vCPU thread running `tasksPerVCPU` tasks of `fn(arg, i)` on this guest's channel.
    private func vcpuThread(_ v: Int, name: String, fn: apf_task_fn, arg: UnsafeMutableRawPointer,
                            taskStats: UnsafeMutablePointer<apf_task_stats>, vcpuStats: UnsafeMutablePointer<apf_vcpu_stats>,
                            then: @escaping @Sendable () -> Void = {}) -> PThread {
        let n = tasksPerVCPU
        nonisolated(unsafe) let (ch, a, ts, vs) = (channel?.channel, arg, taskStats, vcpuStats)
        return PThread(name: name) {
            _ = apf_run_tasks(ch, UInt32(v), Int32(n), TaskGuest.stackBytes, fn, a, ts, vs)
            then()
        }
    }

    /// Starts the vCPU threads; returns when they run.
    public func start() {
        for v in 0..<vcpus {
            threads.append(vcpuThread(v, name: "vcpu\(v)", fn: apf_random_reader, arg: UnsafeMutableRawPointer(args + v),
                                      taskStats: taskStats + v * tasksPerVCPU, vcpuStats: vcpuStats + v))
        }
    }

    /// Asks every task to stop and joins the vCPU threads.
    public func stop() {
        _ = cpc_store_i32_release(stopFlag, 1)
        for t in threads { t.join() }
        threads = []
    }

    /// Work done so far (reads), by every task.
    public var totalOps: UInt64 {
        (0..<(vcpus * tasksPerVCPU)).reduce(0) { $0 + apf_load_u64(&taskStats[$1].ops) }
    }

    /// Per-task time parked on "page not present" and the number of such faults.
    public var perTask: [(stallNs: UInt64, notPresent: UInt64, ops: UInt64)] {
        (0..<(vcpus * tasksPerVCPU)).map { i in
            (apf_load_u64(&taskStats[i].stall_ns), apf_load_u64(&taskStats[i].not_present), apf_load_u64(&taskStats[i].ops))
        }
    }

    public var vcpuTotals: (notPresent: UInt64, ready: UInt64, notifications: UInt64, blockingFallbacks: UInt64, idleNs: UInt64) {
        (0..<vcpus).reduce((0, 0, 0, 0, 0)) { a, v in
            let s = vcpuStats + v
            return (a.0 + apf_load_u64(&s.pointee.not_present), a.1 + apf_load_u64(&s.pointee.ready),
                    a.2 + apf_load_u64(&s.pointee.notifications), a.3 + apf_load_u64(&s.pointee.blocking_fallbacks),
                    a.4 + apf_load_u64(&s.pointee.idle_ns))
        }
    }

    /// Brings every page in from inside tasks (so that code outside them, such
    /// as the integrity check, never touches a missing page under SIGBUS).
    public func touchAll() {
        let per = UnsafeMutablePointer<apf_touch_args>.allocate(capacity: vcpus)
        defer { per.deallocate() }
        let slices = (pages + vcpus - 1) / vcpus
        var ts: [PThread] = []
        let tasks = tasksPerVCPU
        for v in 0..<vcpus {
            let from = min(v * slices, pages), to = min(from + slices, pages)
            (per + v).initialize(to: apf_touch_args(base: UnsafePointer(base.assumingMemoryBound(to: UInt8.self)) + from * pageSize,
                                                    pages: UInt64(to - from), page_size: UInt64(pageSize), tasks: Int32(tasks), checksum: 0))
            let stats = UnsafeMutablePointer<apf_task_stats>.allocate(capacity: tasks)
            stats.initialize(repeating: apf_task_stats(), count: tasks)
            let vs = UnsafeMutablePointer<apf_vcpu_stats>.allocate(capacity: 1)
            vs.initialize(to: apf_vcpu_stats())
            nonisolated(unsafe) let (sU, vU) = (stats, vs)
            ts.append(vcpuThread(v, name: "vcpu\(v)-touch", fn: apf_touch_all, arg: UnsafeMutableRawPointer(per + v),
                                 taskStats: stats, vcpuStats: vs) {
                sU.deallocate()
                vU.deallocate()
            })
        }
        for t in ts { t.join() }
    }
}
