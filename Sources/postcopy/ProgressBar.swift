import Foundation
import PostcopyCore
import PostcopyDestination

/// A one-line progress bar on stderr, redrawn every 200 ms.
final class ProgressBar: @unchecked Sendable {
    private let thread: PThread
    private let stopFlag = StopFlag()

    final class StopFlag: @unchecked Sendable {
        let lock = NSLockLite()
        var stopped = false
    }

    init(_ dest: StandaloneDestination) {
        let flag = stopFlag
        thread = PThread(name: "progress", priority: .idle) {
            let t0 = nowNanoseconds()
            while !flag.lock.withLock({ flag.stopped }) {
                usleep(200_000)
                guard let (c, total) = dest.live.withLock({ $0 }) else { continue }
                let done = c.settledPages.load(ordering: .relaxed)
                let frac = total == 0 ? 1 : Double(done) / Double(total)
                let width = 30
                let filled = Int(frac * Double(width))
                let bar = String(repeating: "#", count: filled) + String(repeating: ".", count: width - filled)
                let secs = Double(nowNanoseconds() - t0) / 1e9
                let line = "\r[\(bar)] \(fixed(frac * 100, 1))%  demand \(c.demandPages.load(ordering: .relaxed))  background \(c.backgroundPages.load(ordering: .relaxed))  \(fixed(secs, 1)) s "
                FileHandle.standardError.write(line.data(using: .utf8)!)
            }
            FileHandle.standardError.write("\r\u{1B}[K".data(using: .utf8)!)
        }
    }

    func finish() {
        stopFlag.lock.withLock { stopFlag.stopped = true }
        thread.join()
    }
}
