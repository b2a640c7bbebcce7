import CGuestAPF
import CPostcopy
import PostcopyCore
#if canImport(Glibc)
import Glibc
#endif

/// The guest's end of a paravirtual async-page-fault channel: shared memory
/// (a memfd with the two rings) and two eventfds, ready to hand to the daemon.
public final class APFGuestChannel: @unchecked Sendable {
    public let memfd: OwnedFD
    public let requestFD: OwnedFD
    public let completionFD: OwnedFD
    let mapping: MemoryMapping
    let channel: OpaquePointer

    public init(requestEntries: UInt32 = 256, completionEntries: UInt32 = 256) throws(SystemError) {
        let bytes = apf_channel_bytes(requestEntries, completionEntries)
        let m = cpc_memfd_create("apf-channel", 1 /* MFD_CLOEXEC */)
        guard m >= 0 else { throw SystemError("memfd_create", errno: -m) }
        memfd = OwnedFD(m)
        guard ftruncate(m, off_t(bytes)) == 0 else { throw SystemError("ftruncate of the APF channel", errno: errno) }
        mapping = try MemoryMapping.file(fd: m, length: bytes, writable: true)
        let r = cpc_eventfd(0, 0o2000000 /* EFD_CLOEXEC */), c = cpc_eventfd(0, 0o2000000 /* EFD_CLOEXEC */)
        guard r >= 0, c >= 0 else { throw SystemError("eventfd", errno: -min(r, c)) }
        requestFD = OwnedFD(r)
        completionFD = OwnedFD(c)
        guard let ch = apf_channel_create(mapping.base, bytes, requestEntries, completionEntries, r, c) else {
            throw SystemError("apf_channel_create", errno: EINVAL)
        }
        channel = ch
        _ = apf_install_handler()
    }

    deinit { apf_channel_destroy(channel) }

    /// The shared memory (for tests that play a hostile guest).
    public var mappingBase: UnsafeRawPointer { UnsafeRawPointer(mapping.base) }

    /// The fds in the order the daemon expects them (memfd, request, completion).
    public var fds: [Int32] { [memfd.raw, requestFD.raw, completionFD.raw] }
}

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
    public static let stackBytes = 256 << 10

    public init(base: UnsafeMutableRawPointer, bytes: Int, vcpus: Int, tasksPerVCPU: Int, think: UInt32, seed: UInt64,
                channel: APFGuestChannel?) {
        self.vcpus = vcpus
        self.tasksPerVCPU = tasksPerVCPU
        self.channel = channel
        self.base = base
        pages = bytes / 4096
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
                                                      page_size: 4096, seed: seed &+ UInt64(v) &* 0x9E37_79B9, think: think,
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
            (per + v).initialize(to: apf_touch_args(base: UnsafePointer(base.assumingMemoryBound(to: UInt8.self)) + from * 4096,
                                                    pages: UInt64(to - from), page_size: 4096, tasks: Int32(tasks), checksum: 0))
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
