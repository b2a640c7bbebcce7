import CPostcopy
import Foundation
import PostcopyCore

/// Prints the guest's operations per second once a second until stopped.
final class OpsReporter: @unchecked Sendable {
    private let stop: EventFD
    private let thread: PThread

    init(side: String, json: Bool, intervalMs: Int32 = 1000, ops: @escaping @Sendable () -> UInt64) throws {
        let stop = try EventFD()
        self.stop = stop
        thread = PThread(name: "ops-report") {
            var last = ops()
            var lastT = nowNanoseconds()
            while cpc_poll1(stop.fd.raw, Int16(POLLIN), intervalMs) == 0 {
                let now = nowNanoseconds(), cur = ops()
                let rate = Double(cur - last) / (Double(now - lastT) / 1e9)
                if json {
                    emitEvent(.ops(.init(side: side, tNs: now, opsPerS: Int(rate))))
                } else {
                    FileHandle.standardError.write("[\(side)] \(Int(rate)) ops/s\n".data(using: .utf8)!)
                }
                last = cur
                lastT = now
            }
        }
    }

    func finish() {
        stop.signal()
        thread.join()
    }
}
