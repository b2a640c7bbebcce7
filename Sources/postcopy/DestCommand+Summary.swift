import PostcopyCore
import PostcopyDestination
import PostcopyTransport

extension DestCommand {
    func printSummary(_ r: DestinationReport) {
        let fl = r.faultLatency, gl = r.guestTouchLatency
        let rate = r.timeToFullCopySeconds > 0 ? Double(r.nonZeroPages * r.pageSize) / r.timeToFullCopySeconds : 0
        print("""
            postcopy migration of \(formatBytes(Double(r.guestBytes))) over \(r.transport): \(r.digestMatch ? "INTEGRITY OK" : "INTEGRITY MISMATCH") (digest \(r.destinationDigest), source \(r.sourceDigest))
              total time          \(fixed(r.totalSeconds, 3)) s (handshake \(fixed(r.handshakeSeconds, 3)) s, full copy \(fixed(r.timeToFullCopySeconds, 3)) s = \(formatBytes(rate))/s, verify \(fixed(r.digestSeconds, 3)) s)
              install             \(r.installPath)\(r.installPath == "copy" ? "" : " (guest RAM preallocated in \(fixed(r.preallocationSeconds, 3)) s before the stream)")
              pages               \(r.totalPages) total: \(r.demandPages) demanded, \(r.backgroundPages) streamed, \(r.zeroPages) zero (never sent; \(r.zeroPagesMappedAhead) mapped ahead, \(r.zeroPagesFaulted) faulted)
              faults              \(r.faults) (\(r.faultsCoalesced) coalesced onto in-flight pages)
              bytes on the wire   \(formatBytes(Double(r.bytesReceived))) in, \(formatBytes(Double(r.bytesSent))) out (\(fixed(r.wireOverhead, 4)) × non-zero RAM)
              encryption          \(r.encrypted ? "AES-256-GCM (\(StreamKeys.library)), \(formatBytes(Double(r.bytesDecrypted))) decrypted" : "none (no key, or --encryption off)")
              fault service       p50 \(formatDuration(ns: fl.p50Ns))  p99 \(formatDuration(ns: fl.p99Ns))  max \(formatDuration(ns: fl.maxNs))  (\(fl.count) faults)
              guest-seen faults   p50 \(formatDuration(ns: gl.p50Ns))  p99 \(formatDuration(ns: gl.p99Ns))  max \(formatDuration(ns: gl.maxNs))  (\(gl.count) touches that faulted)
              memory              \(formatBytes(Double(r.rssOutsideGuestMaxBytes))) resident outside guest RAM (max); CPU \(fixed(r.cpuSeconds, 3)) s
            """)
        if !r.recoveryNs.isEmpty {
            print("  reconnects          \(r.recoveryNs.count) after broken connections: \(r.recoveryNs.map { formatDuration(ns: $0) }.joined(separator: ", "))")
        }
    }
}
