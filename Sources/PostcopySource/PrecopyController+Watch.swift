import Logging
import PostcopyCore
#if canImport(Glibc)
import Glibc
#endif

/// What `PrecopyController` watches until the pause: a destination that never
/// asks, one that went away (its precopy cancelled), and (auto) a guest that
/// rewrites pages as fast as pass 1 sends them.
extension PrecopyController {
    /// Until the pause: gives up on a destination that never asks, cancels
    /// the precopy of one that went away, and (auto) stops a pass whose pages
    /// the guest rewrites as fast as they are sent.
    func watch() {
        var t0 = nowNanoseconds()
        let pageSize = memory.table.pageSize
        // The previous window's end: pass, pages written since its scan, bytes sent.
        var last = (pass: 0, written: 0, bytes: 0)
        var outpaced = 0
        while !memory.isFrozen {
            usleep(Self.windowMicroseconds)
            if let gone = abandonIfGone() {
                logger?.warning("precopy cancelled: the destination copying it (session \(gone)) has been away for \(Int(abandonSeconds)) s; the guest keeps running, another destination may start over")
                t0 = nowNanoseconds()
                last = (0, 0, 0)
                outpaced = 0
                continue
            }
            let (owner, tracker, done, bytes, paused, tracked, passes) = state.withLock {
                ($0.owner, $0.tracker, $0.collects, $0.bytesSent, $0.pauseRequested, $0.trackedUpTo, $0.passPages.count)
            }
            if paused { return }
            let elapsed = Double(nowNanoseconds() - t0) / 1e9
            guard owner != nil, let tracker else {
                if elapsed > destinationWaitSeconds {
                    pause("no destination asked for precopy within \(Int(destinationWaitSeconds)) s: postcopy only")
                    return
                }
                continue
            }
            // Pass 1 only: later passes are judged by how much they shrink
            // (their windows also see the hot set rewritten as it is sent).
            guard policy.mode == .auto, passes == 1, let written = try? tracker.peek(pages: 0..<tracked).count else { continue }
            // A scan since the last look starts the count of written pages anew.
            let newlyWritten = done == last.pass ? max(0, written - last.written) : written
            let sent = (bytes - last.bytes) / pageSize
            switch policy.outpaced(newlyWritten: newlyWritten, sent: sent) {
            case true?: outpaced += 1
            case false?: outpaced = 0
            case nil: continue  // too little sent to judge: the window goes on
            }
            last = (done, written, bytes)
            if case .stop(let why) = policy.duringPass(windows: outpaced, newlyWritten: newlyWritten, sent: sent, passesDone: passes,
                                                      elapsedSeconds: elapsed, bytesSent: bytes, ramBytes: memory.mapping.length) {
                pause(why)
                return
            }
        }
    }

    /// A main connection of `session` came (true) or went (false): how the
    /// owner's absence is timed (`abandonSeconds`).
    func mainChannel(session: UInt64, connected: Bool) {
        state.withLock { s in
            guard s.owner == session else { return }
            s.ownerGoneAt = connected ? 0 : nowNanoseconds()
        }
    }

    /// Before the pause, once the owner has been away for `abandonSeconds`:
    /// precopy starts over from nothing (tracking stopped, every page
    /// untracked), and the owner's session id is returned. A late request of
    /// that session finds itself out of order, its pages refused.
    private func abandonIfGone() -> UInt64? {
        let now = nowNanoseconds()
        let cancelled: (UInt64, (any DirtyTracker)?)? = state.withLock { s in
            guard let owner = s.owner, s.ownerGoneAt != 0, !s.pauseRequested,
                  Double(now - s.ownerGoneAt) / 1e9 >= abandonSeconds else { return nil }
            let pages = memory.table.totalPages
            var fresh = State(served: PageBitmap(pages: pages), everSent: PageBitmap(pages: pages))
            fresh.begunAt = now  // the wait for a destination starts again
            fresh.abandoned = s.abandoned + 1
            let tracker = s.tracker
            s = fresh
            return (owner, tracker)
        }
        guard let (owner, tracker) = cancelled else { return nil }
        tracker?.stop()
        return owner
    }
}
