/// When precopy stops and the guest pauses (`--precopy off|N|auto`). Pure
/// logic: the controller feeds it what it measured.
///
/// `auto` stops at the first of:
/// - *converged*: a pass has at most `convergedPages` pages left to send;
/// - *not shrinking*: a pass's dirty set is more than `shrinkRatio` of the
///   previous pass's (the guest writes about as fast as passes copy), unless
///   the previous pass did shrink and the set is at most `patientPages`: then
///   only a second such pass in a row stops. One such pass alone can be the
///   machine: a pass slowed down lets the guest write more (1 GiB zipf:
///   passes of 262 144, 26 064, then 27 629 pages, stopped there with 28k
///   pages stale at the pause, where the other runs of the same bench
///   converged to 200-4 000). A guest writing all over its RAM gets no such
///   patience;
/// - *writes outpace the copy*: during pass 1, in `outpacedWindows`
///   consecutive windows of about 5 ms, the guest wrote more new pages than
///   `outpaceRatio` × the pages sent (a guest writing everywhere: copying on
///   is wasted, every page it rewrites crosses twice; stopping within tens of
///   ms keeps hybrid within a few percent of pure postcopy's total time). One
///   window is not enough: the first one after a scan also sees the guest's
///   hot set being written again, which is bounded;
/// - a budget: `maxPasses`, `maxSeconds` of precopy, or `maxBytesFactor` × RAM
///   sent in precopy (the way operators bound convergence).
///
/// Pure precopy (`postcopyAfter` false, `--postcopy off`): the same, except
/// that writes outpacing the copy do not end pass 1: with no postcopy after
/// the pause, a page not copied now is copied while the guest is paused.
public struct PrecopyPolicy: Sendable, Equatable {
    public enum Mode: Sendable, Equatable {
        case off
        case passes(Int)
        case auto
    }

    public var mode: Mode
    /// Whether postcopy follows the pause (hybrid); false: pure precopy.
    public var postcopyAfter = true
    public var maxPasses = 16
    public var shrinkRatio = 0.75
    public var convergedPages: Int
    /// At most this many dirty pages (an eighth of RAM) for a second chance (see *not shrinking*).
    public var patientPages: Int
    public var outpaceRatio = 0.5
    public var outpacedWindows = 2
    /// Pages a window must have sent to be judged.
    public var windowMinimumSent: Int
    public var maxSeconds: Double = 60
    public var maxBytesFactor: Double = 4

    /// For RAM of `totalPages` pages.
    public init(mode: Mode, totalPages: Int) {
        self.mode = mode
        convergedPages = max(256, totalPages / 1000)
        patientPages = totalPages / 8
        windowMinimumSent = max(256, min(1024, totalPages / 100))
    }

    /// Parses `off`, `auto` or a number of passes (1...64).
    public static func mode(parsing text: String) -> Mode? {
        switch text {
        case "off": return .off
        case "auto": return .auto
        default:
            guard let n = Int(text), (1...64).contains(n) else { return nil }
            return .passes(n)
        }
    }

    public enum Verdict: Sendable, Equatable {
        case go
        case stop(String)
    }

    /// Before pass `pass` (from 2: pass 1 always runs), whose dirty set holds
    /// `dirty` pages, the previous one `previous`, and the one before that
    /// `beforePrevious` (0: none, or not known: no second chance).
    public func beforePass(_ pass: Int, dirty: Int, previous: Int, beforePrevious: Int = 0, elapsedSeconds: Double,
                           bytesSent: Int, ramBytes: Int) -> Verdict {
        switch mode {
        case .off:
            return .stop("precopy is off")
        case .passes(let n):
            return pass > n ? .stop("\(n) precopy pass\(n == 1 ? "" : "es") done, \(dirty) pages dirty") : .go
        case .auto:
            if dirty <= convergedPages {
                return .stop("converged: \(dirty) pages dirty after pass \(pass - 1) (at most \(convergedPages) wanted)")
            }
            let previousShrank = beforePrevious > 0 && Double(previous) <= shrinkRatio * Double(beforePrevious)
            if Double(dirty) > shrinkRatio * Double(previous), !previousShrank || dirty > patientPages {
                let pct = previous == 0 ? 100 : dirty * 100 / previous
                let again: String
                switch (beforePrevious, previousShrank) {
                case (0, _): again = ""
                case (_, true): again = " (more than an eighth of RAM)"
                case (_, false): again = " (the pass before did not shrink either: \(previous * 100 / beforePrevious) %)"
                }
                return .stop("not converging: \(dirty) pages dirty after pass \(pass - 1), \(pct) % of the \(previous) of the pass before\(again)")
            }
            if let budget = budgetExceeded(passes: pass - 1, elapsedSeconds: elapsedSeconds, bytesSent: bytesSent, ramBytes: ramBytes) {
                return .stop(budget)
            }
            return .go
        }
    }

    /// Whether one window outpaced the copy: the guest wrote `newlyWritten`
    /// pages not written before since the last scan while `sent` were sent.
    /// Nil: too few sent to judge.
    public func outpaced(newlyWritten: Int, sent: Int) -> Bool? {
        guard sent >= windowMinimumSent else { return nil }
        return Double(newlyWritten) > outpaceRatio * Double(sent)
    }

    /// During a pass (auto only), after `windows` consecutive outpaced windows,
    /// the last with `newlyWritten` and `sent` pages.
    public func duringPass(windows: Int, newlyWritten: Int, sent: Int, passesDone: Int, elapsedSeconds: Double,
                           bytesSent: Int, ramBytes: Int) -> Verdict {
        guard mode == .auto else { return .go }
        if postcopyAfter, windows >= outpacedWindows {
            return .stop("not converging: the guest writes faster than precopy copies (\(newlyWritten) new pages written while \(sent) were sent, \(windows) windows in a row)")
        }
        return budgetExceeded(passes: passesDone, elapsedSeconds: elapsedSeconds, bytesSent: bytesSent, ramBytes: ramBytes).map { .stop($0) } ?? .go
    }

    private func budgetExceeded(passes: Int, elapsedSeconds: Double, bytesSent: Int, ramBytes: Int) -> String? {
        if passes >= maxPasses { return "budget: \(passes) passes" }
        if elapsedSeconds >= maxSeconds { return "budget: \(Int(elapsedSeconds)) s of precopy" }
        if Double(bytesSent) >= maxBytesFactor * Double(ramBytes) {
            return "budget: \(bytesSent >> 20) MiB sent in precopy (\(maxBytesFactor)× RAM)"
        }
        return nil
    }
}
