import PostcopySource
import Testing

/// The switchover policy on its own (pure logic: what the controller measured in, a verdict out).
@Suite struct PrecopyPolicyTests {
    let pages = 262_144  // 1 GiB
    var auto: PrecopyPolicy { PrecopyPolicy(mode: .auto, totalPages: pages) }

    func stops(_ v: PrecopyPolicy.Verdict) -> String? { if case .stop(let why) = v { why } else { nil } }

    @Test func parsesTheCommandLineForms() {
        #expect(PrecopyPolicy.mode(parsing: "off") == .off)
        #expect(PrecopyPolicy.mode(parsing: "auto") == .auto)
        #expect(PrecopyPolicy.mode(parsing: "3") == .passes(3))
        for bad in ["0", "65", "-1", "fast", ""] { #expect(PrecopyPolicy.mode(parsing: bad) == nil, "\(bad)") }
    }

    @Test func fixedPassesStopAfterTheirCount() {
        let p = PrecopyPolicy(mode: .passes(3), totalPages: pages)
        #expect(stops(p.beforePass(2, dirty: 9000, previous: 10000, elapsedSeconds: 1, bytesSent: 0, ramBytes: 1 << 30)) == nil)
        #expect(stops(p.beforePass(3, dirty: 9000, previous: 9000, elapsedSeconds: 1, bytesSent: 0, ramBytes: 1 << 30)) == nil)
        #expect(stops(p.beforePass(4, dirty: 10, previous: 9000, elapsedSeconds: 1, bytesSent: 0, ramBytes: 1 << 30))?.contains("3 precopy passes") == true)
        // Fixed passes never stop early on their own.
        #expect(stops(p.duringPass(windows: 9, newlyWritten: 1 << 20, sent: 1, passesDone: 1, elapsedSeconds: 1, bytesSent: 0, ramBytes: 1 << 30)) == nil)
    }

    @Test func autoStopsWhenConvergedOrNotShrinking() {
        let a = auto
        // Shrinking well: go on.
        #expect(stops(a.beforePass(2, dirty: 14000, previous: 262_144, elapsedSeconds: 0.5, bytesSent: 1 << 30, ramBytes: 1 << 30)) == nil)
        #expect(stops(a.beforePass(3, dirty: 3000, previous: 14000, elapsedSeconds: 0.6, bytesSent: 1 << 30, ramBytes: 1 << 30)) == nil)
        // Few pages left: converged.
        #expect(stops(a.beforePass(4, dirty: 200, previous: 3000, elapsedSeconds: 0.7, bytesSent: 1 << 30, ramBytes: 1 << 30))?.hasPrefix("converged") == true)
        // Not shrinking by a quarter: stop.
        #expect(stops(a.beforePass(4, dirty: 2400, previous: 3000, elapsedSeconds: 0.7, bytesSent: 1 << 30, ramBytes: 1 << 30))?.hasPrefix("not converging") == true)
        #expect(stops(a.beforePass(4, dirty: 2200, previous: 3000, elapsedSeconds: 0.7, bytesSent: 1 << 30, ramBytes: 1 << 30)) == nil)
        // One pass that did not shrink, after one that did, is given another pass ...
        #expect(stops(a.beforePass(3, dirty: 27_629, previous: 26_064, beforePrevious: 262_144, elapsedSeconds: 0.9, bytesSent: 1 << 30, ramBytes: 1 << 30)) == nil)
        // ... a second one in a row stops.
        #expect(stops(a.beforePass(4, dirty: 25_000, previous: 27_629, beforePrevious: 26_064, elapsedSeconds: 1.0, bytesSent: 1 << 30, ramBytes: 1 << 30))?.hasPrefix("not converging") == true)
        #expect(stops(a.beforePass(4, dirty: 5_000, previous: 27_629, beforePrevious: 26_064, elapsedSeconds: 1.0, bytesSent: 1 << 30, ramBytes: 1 << 30)) == nil)
        // No second chance for a set of more than an eighth of RAM (a guest writing everywhere).
        #expect(stops(a.beforePass(3, dirty: 40_000, previous: 35_000, beforePrevious: 262_144, elapsedSeconds: 0.9, bytesSent: 1 << 30, ramBytes: 1 << 30))?.contains("an eighth") == true)
    }

    @Test func autoStopsOnItsBudgets() {
        let a = auto
        #expect(stops(a.beforePass(17, dirty: 1000, previous: 100_000, elapsedSeconds: 5, bytesSent: 0, ramBytes: 1 << 30))?.contains("16 passes") == true)
        #expect(stops(a.beforePass(3, dirty: 1000, previous: 100_000, elapsedSeconds: 61, bytesSent: 0, ramBytes: 1 << 30))?.contains("61 s") == true)
        #expect(stops(a.beforePass(3, dirty: 1000, previous: 100_000, elapsedSeconds: 5, bytesSent: 5 << 30, ramBytes: 1 << 30))?.contains("MiB sent") == true)
        #expect(stops(a.duringPass(windows: 0, newlyWritten: 0, sent: 5000, passesDone: 1, elapsedSeconds: 61, bytesSent: 0, ramBytes: 1 << 30)) != nil)
    }

    /// A guest writing new pages faster than half the copy rate, two windows
    /// in a row, stops pass 1; one window (its hot set written again right
    /// after a scan) does not; windows with too little sent are not judged.
    @Test func autoJudgesPass1ByWindowsOfWritesAgainstTheCopy() {
        let a = auto
        #expect(a.outpaced(newlyWritten: 3000, sent: 5000) == true)
        #expect(a.outpaced(newlyWritten: 2000, sent: 5000) == false)
        #expect(a.outpaced(newlyWritten: 3000, sent: 100) == nil, "too few pages sent to judge")
        #expect(stops(a.duringPass(windows: 1, newlyWritten: 3000, sent: 5000, passesDone: 1, elapsedSeconds: 0.02, bytesSent: 0, ramBytes: 1 << 30)) == nil)
        #expect(stops(a.duringPass(windows: 2, newlyWritten: 3000, sent: 5000, passesDone: 1, elapsedSeconds: 0.04, bytesSent: 0, ramBytes: 1 << 30))?.hasPrefix("not converging") == true)
    }

    /// Pure precopy (--postcopy off): writes outpacing the copy do not end
    /// pass 1 (what it leaves is copied while paused); the rest of auto holds.
    @Test func purePrecopyIsNotStoppedByOutpacingWrites() {
        var a = auto
        a.postcopyAfter = false
        #expect(stops(a.duringPass(windows: 5, newlyWritten: 5000, sent: 5000, passesDone: 1, elapsedSeconds: 0.1, bytesSent: 0, ramBytes: 1 << 30)) == nil)
        #expect(stops(a.duringPass(windows: 5, newlyWritten: 5000, sent: 5000, passesDone: 1, elapsedSeconds: 61, bytesSent: 0, ramBytes: 1 << 30))?.contains("61 s") == true)
        #expect(stops(a.beforePass(2, dirty: 100, previous: 262_144, elapsedSeconds: 1, bytesSent: 0, ramBytes: 1 << 30))?.hasPrefix("converged") == true)
        #expect(stops(a.beforePass(3, dirty: 9000, previous: 10_000, elapsedSeconds: 1, bytesSent: 0, ramBytes: 1 << 30))?.hasPrefix("not converging") == true)
    }

    @Test func offStopsAtOnce() {
        let p = PrecopyPolicy(mode: .off, totalPages: pages)
        #expect(stops(p.beforePass(2, dirty: 0, previous: 0, elapsedSeconds: 0, bytesSent: 0, ramBytes: 1 << 30)) != nil)
    }
}
