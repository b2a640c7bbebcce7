import Foundation
import PostcopyHandoff
import PostcopySource

/// One JSON line that the children of `migrate` write on stdout: the source guest
/// (`guest run --json`), the destination guest (`guest resume --json`) and the
/// page-fault daemon (`dest --handoff --json`). Written and read as this type on
/// both ends; on the wire an object with `"event": NAME` next to the payload's fields.
enum GuestEvent: Codable, Sendable {
    /// `guest run`: serving on `port`; `dest --handoff`: waiting for VMMs on `handoff`.
    case listening(Listening)
    /// `guest resume`: RAM set up (and handed to the daemon), waiting for the device state.
    case ready(Ready)
    /// `guest run`: the migration started ("migrate"): precopy runs, or the guest pauses at once.
    case migrating(Migrating)
    /// `guest run`: the vCPUs stopped and the device state is published.
    case paused(Paused)
    /// `guest resume`: the vCPUs run at the destination.
    case resumed(Resumed)
    /// Guest operations per second, once per report interval.
    case ops(Ops)
    /// `guest resume --stop-and-copy`: all RAM copied while paused.
    case copied(Copied)
    /// `guest resume --tasks`: the task guest's work.
    case taskWork(TaskWork)
    /// `guest resume`: the integrity check.
    case verified(Verified)
    /// `guest run`: the source stopped serving.
    case sourceDone(SourceDone)
    /// `dest --handoff`: a VMM's handoff was accepted and its memory prepared
    /// (preallocated through the alias on the continue path).
    case prepared(Prepared)
    /// `dest --handoff`: a VMM's handoff was refused (the reason).
    case refused(Refused)
    /// `dest --handoff`: a VMM has every page.
    case complete(Complete)
    /// `dest --handoff`: a VMM's session ended.
    case session(HandoffSessionReport)

    struct Listening: Codable, Sendable {
        var port: Int?
        var memoryBytes: Int?
        var handoff: String?
        /// `dest --handoff --metrics-listen`: the metrics endpoint's port.
        var metricsPort: Int?
        enum CodingKeys: String, CodingKey { case port, memoryBytes = "memory_bytes", handoff, metricsPort = "metrics_port" }
    }

    struct Ready: Codable, Sendable {
        var memoryBytes: Int
        enum CodingKeys: String, CodingKey { case memoryBytes = "memory_bytes" }
    }

    struct Migrating: Codable, Sendable {
        var tNs: UInt64, precopy: String
        enum CodingKeys: String, CodingKey { case tNs = "t_ns", precopy }
    }

    struct Paused: Codable, Sendable {
        var pausedAtNs: UInt64, stopNs: UInt64, ops: UInt64
        /// Why the guest paused (the operator, or precopy's switchover decision).
        var reason: String? = nil
        enum CodingKeys: String, CodingKey { case pausedAtNs = "paused_at_ns", stopNs = "stop_ns", ops, reason }
    }

    struct Resumed: Codable, Sendable {
        var resumedAtNs: UInt64, downtimeNs: UInt64, deviceStateReceivedNs: UInt64, restoreNs: UInt64
        /// Pure precopy: from the pause to the daemon's "every page is in" (part of the downtime).
        var allPagesInNs: UInt64? = nil
        enum CodingKeys: String, CodingKey {
            case resumedAtNs = "resumed_at_ns", downtimeNs = "downtime_ns"
            case deviceStateReceivedNs = "device_state_received_ns", restoreNs = "restore_ns", allPagesInNs = "all_pages_in_ns"
        }
    }

    struct Ops: Codable, Sendable {
        var side: String, tNs: UInt64, opsPerS: Int
        enum CodingKeys: String, CodingKey { case side, tNs = "t_ns", opsPerS = "ops_per_s" }
    }

    struct Copied: Codable, Sendable {
        var bytes: UInt64, copyNs: UInt64
        enum CodingKeys: String, CodingKey { case bytes, copyNs = "copy_ns" }
    }

    struct TaskWork: Codable, Sendable {
        struct Stalls: Codable, Sendable { var p50: UInt64, max: UInt64, mean: UInt64 }
        var apf: Bool, vcpus: Int, tasksPerVCPU: Int, think: Int, workWindowMs: Int, opsInWindow: UInt64, ops: UInt64
        var notPresent: UInt64, ready: UInt64, notifications: UInt64, blockingFallbacks: UInt64, vcpuIdleNs: UInt64
        var taskStallNs: Stalls, taskStallNsEach: [UInt64]
        enum CodingKeys: String, CodingKey {
            case apf, vcpus, tasksPerVCPU = "tasks_per_vcpu", think, workWindowMs = "work_window_ms", opsInWindow = "ops_in_window", ops
            case notPresent = "not_present", ready, notifications, blockingFallbacks = "blocking_fallbacks", vcpuIdleNs = "vcpu_idle_ns"
            case taskStallNs = "task_stall_ns", taskStallNsEach = "task_stall_ns_each"
        }
    }

    struct Verified: Codable, Sendable {
        var ok: Bool, kvSlotsVerified: Int, kvSlotsFailed: Int, getChecksumFailures: UInt64
        var pagesVerified: Int, pagesVerifiedBeforeFirstWrite: Int, pagesMismatched: Int, ops: UInt64
        /// Postcopy: distinct pages the guest touched until every page was in
        /// (nil: not measured, or the copy outlasted the run).
        var pagesTouchedBeforeFullCopy: Int? = nil
        /// From the resume until the guest had done `guest resume --work-ops` operations.
        var timeToWorkNs: UInt64? = nil
        /// The first pages (at most 16) that differ from the source's RAM at pause.
        var mismatchedPages: [Int]? = nil
        enum CodingKeys: String, CodingKey {
            case ok, kvSlotsVerified = "kv_slots_verified", kvSlotsFailed = "kv_slots_failed", getChecksumFailures = "get_checksum_failures"
            case pagesVerified = "pages_verified", pagesVerifiedBeforeFirstWrite = "pages_verified_before_first_write"
            case pagesMismatched = "pages_mismatched", ops, pagesTouchedBeforeFullCopy = "pages_touched_before_full_copy"
            case timeToWorkNs = "time_to_work_ns", mismatchedPages = "mismatched_pages"
        }
    }

    struct SourceDone: Codable, Sendable {
        var demandPages: UInt64, backgroundPages: UInt64, pagesSentTwice: UInt64, bytesSent: UInt64, cpuSeconds: Double
        var precopy: PrecopyReport? = nil
        enum CodingKeys: String, CodingKey {
            case demandPages = "demand_pages", backgroundPages = "background_pages", pagesSentTwice = "pages_sent_twice"
            case bytesSent = "bytes_sent", cpuSeconds = "cpu_seconds", precopy
        }
    }

    struct Prepared: Codable, Sendable {
        var vmmPid: Int, installPath: String, preallocationSeconds: Double
        enum CodingKeys: String, CodingKey {
            case vmmPid = "vmm_pid", installPath = "install_path", preallocationSeconds = "preallocation_seconds"
        }
    }

    struct Refused: Codable, Sendable {
        var vmmPid: Int, reason: String
        enum CodingKeys: String, CodingKey { case vmmPid = "vmm_pid", reason }
    }

    struct Complete: Codable, Sendable {
        var vmmPid: Int, completedAtNs: UInt64
        enum CodingKeys: String, CodingKey { case vmmPid = "vmm_pid", completedAtNs = "completed_at_ns" }
    }

    /// The encoder of event lines: sorted keys, one line.
    static var encoder: JSONEncoder {
        let e = JSONEncoder()
        e.outputFormatting = [.sortedKeys]
        return e
    }

    /// Decodes one line; nil for anything that is not a known event.
    static func decode(line: some DataProtocol) -> GuestEvent? {
        try? JSONDecoder().decode(GuestEvent.self, from: Data(line))
    }

    private enum EventKey: String, CodingKey { case event }

    /// The line's `event` field.
    var name: String {
        switch self {
        case .listening: "listening"
        case .ready: "ready"
        case .migrating: "migrating"
        case .paused: "paused"
        case .resumed: "resumed"
        case .ops: "ops"
        case .copied: "copied"
        case .taskWork: "task_work"
        case .verified: "verified"
        case .sourceDone: "source_done"
        case .prepared: "prepared"
        case .refused: "refused"
        case .complete: "complete"
        case .session: "session"
        }
    }

    private var payload: any Encodable {
        switch self {
        case .listening(let p): p
        case .ready(let p): p
        case .migrating(let p): p
        case .paused(let p): p
        case .resumed(let p): p
        case .ops(let p): p
        case .copied(let p): p
        case .taskWork(let p): p
        case .verified(let p): p
        case .sourceDone(let p): p
        case .prepared(let p): p
        case .refused(let p): p
        case .complete(let p): p
        case .session(let p): p
        }
    }

    func encode(to encoder: any Encoder) throws {
        try payload.encode(to: encoder)
        var c = encoder.container(keyedBy: EventKey.self)
        try c.encode(name, forKey: .event)
    }

    init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: EventKey.self)
        switch try c.decode(String.self, forKey: .event) {
        case "listening": self = .listening(try Listening(from: decoder))
        case "ready": self = .ready(try Ready(from: decoder))
        case "migrating": self = .migrating(try Migrating(from: decoder))
        case "paused": self = .paused(try Paused(from: decoder))
        case "resumed": self = .resumed(try Resumed(from: decoder))
        case "ops": self = .ops(try Ops(from: decoder))
        case "copied": self = .copied(try Copied(from: decoder))
        case "task_work": self = .taskWork(try TaskWork(from: decoder))
        case "verified": self = .verified(try Verified(from: decoder))
        case "source_done": self = .sourceDone(try SourceDone(from: decoder))
        case "prepared": self = .prepared(try Prepared(from: decoder))
        case "refused": self = .refused(try Refused(from: decoder))
        case "complete": self = .complete(try Complete(from: decoder))
        case "session": self = .session(try HandoffSessionReport(from: decoder))
        case let other: throw DecodingError.dataCorruptedError(forKey: .event, in: c, debugDescription: "unknown event \(other)")
        }
    }
}

// Typed access for readers (`migrate`): `events.compactMap(\.resumed)`.
extension GuestEvent {
    var listening: Listening? { if case .listening(let e) = self { e } else { nil } }
    var ready: Ready? { if case .ready(let e) = self { e } else { nil } }
    var paused: Paused? { if case .paused(let e) = self { e } else { nil } }
    var migrating: Migrating? { if case .migrating(let e) = self { e } else { nil } }
    var resumed: Resumed? { if case .resumed(let e) = self { e } else { nil } }
    var ops: Ops? { if case .ops(let e) = self { e } else { nil } }
    var taskWork: TaskWork? { if case .taskWork(let e) = self { e } else { nil } }
    var verified: Verified? { if case .verified(let e) = self { e } else { nil } }
    var sourceDone: SourceDone? { if case .sourceDone(let e) = self { e } else { nil } }
    var prepared: Prepared? { if case .prepared(let e) = self { e } else { nil } }
    var refused: Refused? { if case .refused(let e) = self { e } else { nil } }
    var complete: Complete? { if case .complete(let e) = self { e } else { nil } }
    var session: HandoffSessionReport? { if case .session(let e) = self { e } else { nil } }
}

extension GuestEvent {
    /// The event as its JSON line (without the newline).
    var line: String {
        (try? GuestEvent.encoder.encode(self)).map { String(decoding: $0, as: UTF8.self) } ?? name
    }
}
