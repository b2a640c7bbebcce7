import CPostcopy
import Foundation
import PostcopyCore
#if canImport(Glibc)
import Glibc
#endif

/// The VMM's end of the handoff socket, as Firecracker drives an external
/// page-fault handler: connect to the daemon's Unix socket (`AF_UNIX`,
/// `SOCK_STREAM`), send the regions as JSON with the userfaultfd as the single
/// `SCM_RIGHTS` fd in one `sendmsg(2)`, and keep the socket open while the guest
/// runs; closing it ends the VMM's session at the daemon (`HandoffServer`).
public final class VMMHandoffClient: Sendable {
    /// The connected socket (-1 once closed).
    public let socket: OwnedFD

    /// Connects to the daemon listening at `path` (`connect(2)`).
    public init(path: String) throws(SystemError) {
        let s = cpc_unix_connect(path)
        guard s >= 0 else { throw SystemError("connect", errno: -s) }
        socket = OwnedFD(s)
    }

    /// Hands guest memory over: `regions` in Firecracker's `GuestRegionUffdMapping`
    /// JSON (`HandoffMessage.encode`) with `uffd`, the userfaultfd they are
    /// registered with, then the memory files the regions name (`VMMRegion.file`
    /// indexes `files`; none for anonymous memory, Firecracker's message).
    public func handOver(_ regions: [VMMRegion], uffd: Int32, files: [Int32] = []) throws(SystemError) {
        try send(HandoffMessage.encode(regions), fds: [uffd] + files)
    }

    /// Enables paravirtual async page faults (`APFEnable`): `fds` are the channel
    /// memfd, the request eventfd and the completion eventfd, in that order.
    public func enableAPF(fds: [Int32]) throws(SystemError) {
        try send(APFEnable.json, fds: fds)
    }

    /// Asks the daemon to say when every page is in (`CompletionNotice`); the
    /// answer is read by `waitForCompletion`.
    public func requestCompletionNotice() throws(SystemError) {
        try send(CompletionNotice.request, fds: [])
    }

    /// Says the work being recorded is done (`RecordEnd`): a daemon recording
    /// the working set ends its window now.
    public func endRecording() throws(SystemError) {
        try send(RecordEnd.request, fds: [])
    }

    /// Waits up to `ms` for the daemon's completion notice. Throws if the
    /// daemon closed the socket, answered something else, or was silent.
    public func waitForCompletion(timeoutMs ms: Int32) throws -> CompletionNotice.Answer {
        let s = socket.raw
        var line: [UInt8] = []
        let deadline = nowNanoseconds() + UInt64(max(ms, 0)) * 1_000_000
        while true {
            let now = nowNanoseconds()
            guard now < deadline else { throw HandoffError.source("no completion notice from the daemon within \(ms) ms") }
            let left = Int32(min(UInt64(Int32.max), (deadline - now) / 1_000_000 + 1))
            guard cpc_poll1(s, Int16(POLLIN), left) > 0 else { continue }
            var b: UInt8 = 0
            let n = recv(s, &b, 1, 0)
            if n == 0 { throw HandoffError.source("the daemon closed the handoff socket before every page was in") }
            if n < 0 {
                if errno == EINTR { continue }
                throw HandoffError.system(SystemError("recv", errno: errno))
            }
            if b == UInt8(ascii: "\n") { return try CompletionNotice.decode(line) }
            line.append(b)
            guard line.count <= CompletionNotice.maxAnswerBytes else {
                throw HandoffError.malformedJSON("the daemon's completion notice is longer than \(CompletionNotice.maxAnswerBytes) bytes")
            }
        }
    }

    /// One message with `fds` attached as `SCM_RIGHTS`, in one `sendmsg(2)`
    /// (the lower level, also for sending messages the daemon must refuse).
    public func send(_ bytes: [UInt8], fds: [Int32]) throws(SystemError) {
        let s = socket.raw
        let n = bytes.withUnsafeBytes { b in
            fds.withUnsafeBufferPointer { cpc_send_with_fds(s, b.baseAddress, b.count, $0.baseAddress, Int32(fds.count)) }
        }
        guard n == bytes.count else { throw SystemError("sendmsg", errno: n < 0 ? Int32(-n) : EIO) }
    }

    /// True when the daemon closed its end within `ms` milliseconds (it refused
    /// the handoff, or the session ended).
    public func closedByDaemon(within ms: Int32 = 10_000) -> Bool {
        let s = socket.raw
        guard s >= 0, cpc_poll1(s, Int16(POLLIN), ms) > 0 else { return false }
        var b: UInt8 = 0
        return recv(s, &b, 1, 0) == 0
    }

    /// The VMM goes away: the daemon releases its session.
    public func close() { socket.close() }
}
