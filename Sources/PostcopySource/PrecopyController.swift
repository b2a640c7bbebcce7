import CPostcopy
import Logging
import PostcopyCore
import PostcopyTransport
import PostcopyWire
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// Precopy at the source: copies RAM to one destination while the guest still
/// runs, in passes the destination asks for (`PrecopyPassRequest`), and decides
/// with `PrecopyPolicy` when the guest pauses. Pass 1 is every page holding
/// data; pass k the pages the `DirtyTracker` says were written since pass k-1
/// was scanned. Every page of a set is protected again by the scan that
/// returns it, before the answer leaves, so a page is always read after its
/// protection: a write racing with the read is in the next set.
///
/// After the pause the final set goes out (`DirtySet.isFinal`): the pages
/// written since the last scan, the pages of the last set the destination had
/// not fetched yet when the guest paused, and the pages it was sent that are a
/// hole of the memory file now (a page punched out is zero, not "written").
/// The destination drops every page it holds from precopy that the final set
/// names; the others are exactly the source's RAM at the pause.
public final class PrecopyController: @unchecked Sendable {
    public let policy: PrecopyPolicy
    let memory: SourceMemory
    private let makeTracker: @Sendable () throws -> any DirtyTracker
    private let requestPause: @Sendable (String) -> Void
    /// How long after `begin` a destination may take to ask for pass 1 before
    /// the guest pauses anyway (postcopy only).
    public let destinationWaitSeconds: Double
    /// How long the destination copying in precopy may stay away (its main
    /// connection gone, not back) before precopy is cancelled: tracking stops,
    /// the guest keeps running, and another destination may start over. Longer
    /// than a destination's own recovery deadline (60 s by default), so that a
    /// destination reconnecting after a cut is never cancelled.
    public let abandonSeconds: Double
    let logger: Logger?

    struct State {
        var begunAt: UInt64 = 0
        var owner: UInt64?
        /// When the owner's main connection went away (0: connected).
        var ownerGoneAt: UInt64 = 0
        /// Destinations whose precopy was cancelled because they went away.
        var abandoned = 0
        var tracker: (any DirtyTracker)?
        /// Requests answered (pieces of pass 1, then one per pass), and scans done.
        var requests = 0
        var collects = 0
        /// The pages tracked so far: [0, trackedUpTo).
        var trackedUpTo = 0
        /// Pages of each pass (pass 1: its pieces together).
        var passPages: [Int] = []
        var passStartedAt: [UInt64] = []
        /// The last set handed out, and the pages of it served since.
        var lastSet = DirtyPages()
        /// Pages a scan reported that no pass handed out (the scan that decided to stop).
        var notHandedOut = DirtyPages()
        var served: PageBitmap
        var servedCount = 0
        var everSent: PageBitmap
        var bytesSent = 0
        /// The destination READs pages itself (it was given RDMA access).
        var readsRemotely = false
        var decision: String?
        var decidedAt: UInt64 = 0
        var pauseRequested = false
        var final: [DirtySet]?
        var finalPages = 0
        var finalScanNanoseconds: UInt64 = 0
        var protectNanoseconds: UInt64 = 0
    }
    let state: Locked<State>
    private let begun: EventFD

    /// `requestPause`: pause the guest now (its freeze follows); called once,
    /// with the reason, from any thread.
    public init(policy: PrecopyPolicy, memory: SourceMemory, destinationWaitSeconds: Double = 10, abandonSeconds: Double = 90,
                tracker: (@Sendable () throws -> any DirtyTracker)? = nil, logger: Logger? = nil,
                requestPause: @escaping @Sendable (String) -> Void) throws(SystemError) {
        self.logger = logger
        self.policy = policy
        self.memory = memory
        self.destinationWaitSeconds = destinationWaitSeconds
        self.abandonSeconds = abandonSeconds
        let m = memory.mapping
        let pageSize = memory.table.pageSize
        makeTracker = tracker ?? { try WriteProtectTracker(base: m.base, length: m.length, pageSize: pageSize, trackingAll: false) }
        self.requestPause = requestPause
        let pages = memory.table.totalPages
        state = Locked(State(served: PageBitmap(pages: pages), everSent: PageBitmap(pages: pages)))
        begun = try EventFD()
    }

    /// Whether a destination may ask for passes (the welcome's capability).
    public var offered: Bool { policy.mode != .off }

    /// The operator starts the migration: precopy runs (or, when off, the
    /// guest pauses at once).
    public func begin() {
        let first = state.withLock { s in
            guard s.begunAt == 0 else { return false }
            s.begunAt = nowNanoseconds()
            return true
        }
        guard first else { return }
        guard offered else {
            pause("precopy is off")
            return
        }
        begun.signal()
        _ = PThread(name: "src-precopy") { [self] in watch() }
    }

    /// Pauses the guest once, for `reason` (the first reason is the decision).
    func pause(_ reason: String) {
        let first = state.withLock { s -> Bool in
            guard !s.pauseRequested else { return false }
            s.pauseRequested = true
            s.decidedAt = nowNanoseconds()
            if s.decision == nil { s.decision = reason }
            return true
        }
        if first { requestPause(reason) }
    }

    /// Pages of a precopy request of `session` were read and sent
    /// (`PageServer`); not counted for a session whose precopy was cancelled.
    func noteServed(session: UInt64, globalFirst first: Int, count: Int) {
        state.withLock { s in
            guard s.owner == session else { return }
            for p in first..<(first + count) where !s.served.contains(p) {
                s.served.insert(p)
                s.servedCount += 1
                s.everSent.insert(p)
            }
            s.bytesSent += count * memory.table.pageSize
        }
    }

    /// `session` was given remote READ access (RDMA): it fetches pages
    /// without this side seeing which.
    func noteRemoteReads(session: UInt64) {
        state.withLock { if $0.owner == session { $0.readsRemotely = true } }
    }

    /// Whether the guest pauses (decided) or paused: a destination should
    /// stop asking for precopy pages (`PageDataHeader.sourcePaused`), so that
    /// the pause itself does not compete with a stream.
    var pausing: Bool { state.withLock { $0.pauseRequested } }

    /// Whether `session` may fetch precopy pages now (it asked for a pass and
    /// the final set has not gone out).
    func mayServe(session: UInt64) -> Bool {
        state.withLock { $0.owner == session && $0.final == nil && $0.requests > 0 }
    }

    /// Pages of pass 1 tracked and handed out at a time: the first pages leave
    /// after protecting 64 MiB, not all of RAM (which takes 20 ms per GiB on
    /// an idle machine and several times that under a guest writing hard), so
    /// that `auto` can judge the guest within tens of ms.
    public static let piecePages = 16384
    /// The first piece is smaller: the sooner pages move, the sooner `auto`
    /// can judge the guest.
    public static let firstPiecePages = 4096
    /// How long one window of `auto`'s look at the guest's writes lasts.
    static let windowMicroseconds: UInt32 = 5_000

    /// The answer to request `pass` of `session`: the set's chunks (final once
    /// the guest paused). Pass 1 goes out piece by piece, one request each;
    /// every later request is one pass of the pages written since the last.
    /// `waitFrozen` waits for the pause and `alive` looks without waiting
    /// (false: the server stops or the peer left; nil then).
    func pass(_ pass: UInt32, session: UInt64, alive: () -> Bool, waitFrozen: () -> Bool) throws(TransportError) -> [DirtySet]? {
        let n = Int(pass)
        try state.withLock { (s: inout State) throws(TransportError) in
            if let owner = s.owner, owner != session {
                throw .protocolViolation("another destination is copying this guest's RAM in precopy (session \(owner))")
            }
            if s.final != nil { throw .protocolViolation("precopy pass \(pass) asked for after the final dirty set") }
            guard n == s.requests + 1 else {
                throw .protocolViolation("precopy pass \(pass) asked for out of order (expected \(s.requests + 1))")
            }
        }
        // The operator's start (or the pause, when it comes first).
        while state.withLock({ $0.begunAt == 0 }) && !memory.isFrozen {
            if cpc_poll1(begun.fd.raw, Int16(POLLIN), 200) > 0 { break }
            if !alive() { return nil }
        }
        if memory.isFrozen { return try finalSet(pass) }
        let t = nowNanoseconds()
        if n == 1 {
            let tracker: any DirtyTracker
            do { tracker = try makeTracker() } catch {
                // No tracking, no precopy: the destination gets an empty final set and goes postcopy.
                pause("dirty tracking unavailable (\(error)): postcopy only")
                guard waitFrozen() else { return nil }
                return try finalSet(pass)
            }
            state.withLock { s in
                s.owner = session
                s.ownerGoneAt = 0
                s.tracker = tracker
                s.passPages.append(0)
                s.passStartedAt.append(t)
            }
        }
        let (tracker, tracked, paused) = state.withLock { ($0.tracker!, $0.trackedUpTo, $0.pauseRequested) }
        let total = memory.table.totalPages
        if paused {
            guard waitFrozen() else { return nil }
            return try finalSet(pass)
        }
        if tracked < total {
            // Pass 1, the next piece: tracked, then handed out whole. Its
            // holes are answered as zero pages (never read): the destination
            // holds every page of RAM as it was at the piece's protection, so
            // the pages not written since are clean at the end, in long runs.
            let piece = tracked..<min(total, tracked + (tracked == 0 ? Self.firstPiecePages : Self.piecePages))
            do { try tracker.startTracking(pages: piece) } catch { throw .local(error) }
            let set = DirtyPages(runs: [piece])
            return try state.withLock { (s: inout State) throws(TransportError) in
                try Self.checkOwner(s, session)
                s.trackedUpTo = piece.upperBound
                s.protectNanoseconds = (tracker as? WriteProtectTracker)?.protectNanoseconds ?? 0
                s.passPages[0] += set.count
                return handOut(set, pass: pass, &s)
            }
        }
        let (previous, beforePrevious, begunAt, bytes) = state.withLock {
            ($0.passPages.last ?? 0, $0.passPages.count >= 2 ? $0.passPages[$0.passPages.count - 2] : 0, $0.begunAt, $0.bytesSent)
        }
        let dirty: DirtyPages
        do { dirty = try tracker.collect() } catch { throw .local(error) }
        let real = state.withLock { $0.passPages.count } + 1
        let verdict = policy.beforePass(real, dirty: dirty.count, previous: previous, beforePrevious: beforePrevious,
                                        elapsedSeconds: Double(t - begunAt) / 1e9,
                                        bytesSent: bytes, ramBytes: memory.mapping.length)
        if case .stop(let why) = verdict {
            try state.withLock { (s: inout State) throws(TransportError) in
                try Self.checkOwner(s, session)
                s.collects += 1
                // Scanned and never handed out: the final set carries them,
                // whoever reads the pages (with what of the last set was not
                // served, by `unserved`).
                s.notHandedOut = dirty
            }
            pause(why)
            guard waitFrozen() else { return nil }
            return try finalSet(pass)
        }
        return try state.withLock { (s: inout State) throws(TransportError) in
            try Self.checkOwner(s, session)
            s.collects += 1
            s.passPages.append(dirty.count)
            s.passStartedAt.append(t)
            return handOut(dirty, pass: pass, &s)
        }
    }

    /// A request of `session` goes on only while its precopy was not
    /// cancelled (`abandonIfGone`) meanwhile.
    private static func checkOwner(_ s: State, _ session: UInt64) throws(TransportError) {
        guard s.owner == session else {
            throw .protocolViolation("precopy of session \(session) was cancelled (it was away too long); start over with a new session")
        }
    }

    /// Hands out `set` as request `pass`'s answer, with any page of the last
    /// set not served yet (none, normally: the destination asks for the next
    /// request once it fetched the last).
    private func handOut(_ set: DirtyPages, pass: UInt32, _ s: inout State) -> [DirtySet] {
        let out = DirtyPages(runs: set.runs + Self.unserved(s, s.lastSet))
        s.lastSet = out
        s.served = PageBitmap(pages: memory.table.totalPages)
        s.servedCount = 0
        s.requests += 1
        return chunks(out, pass: pass, final: false)
    }

    /// What precopy did, for the report.
    public var report: PrecopyReport {
        state.withLock { s in
            let begunAt = s.begunAt
            let since: (UInt64) -> Double = { t in t == 0 || begunAt == 0 ? 0 : Double(Int64(bitPattern: t &- begunAt)) / 1e9 }
            return PrecopyReport(mode: "\(policy.mode)" + (policy.postcopyAfter ? "" : ", postcopy off"), passes: s.passPages, passStartSeconds: s.passStartedAt.map(since),
                                 bytesSent: s.bytesSent, decision: s.decision, decisionSeconds: since(s.decidedAt),
                                 finalDirtyPages: s.final == nil ? nil : s.finalPages,
                                 finalScanSeconds: Double(s.finalScanNanoseconds) / 1e9, protectSeconds: Double(s.protectNanoseconds) / 1e9,
                                 abandonedDestinations: s.abandoned)
        }
    }
}
