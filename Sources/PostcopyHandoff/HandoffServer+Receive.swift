import CPostcopy
import Foundation
import PostcopyCore
import PostcopyDestination

/// Messages from a VMM: the handoff (regions + userfaultfd), then at most an
/// async-page-fault enable and a completion-notice request.
extension HandoffServer {
    /// How long a VMM may take to send its handoff message after connecting (ms).
    static let handoffTimeoutMs: Int32 = 10_000
    /// Largest later message (an async-page-fault enable).
    static let laterMessageMaxBytes = 4096

    /// Descriptors kept from one message: the userfaultfd and the memory files.
    static let maxFDs = 1 + HandoffMessage.maxMemoryFiles

    /// One message from a VMM: `n` is recvmsg's result (bytes, 0 at EOF, -errno),
    /// `fds` the descriptors that came with it (at most `maxFDs` kept;
    /// `truncated` when there were more).
    static func receiveMessage(_ conn: OwnedFD, maxBytes: Int) -> (n: Int, bytes: [UInt8], fds: [Int32], nfds: Int32, truncated: Bool) {
        var buf = [UInt8](repeating: 0, count: maxBytes)
        var fds = [Int32](repeating: -1, count: maxFDs)
        var nfds: Int32 = 0, ctrunc: Int32 = 0
        let n = buf.withUnsafeMutableBytes { b in
            fds.withUnsafeMutableBufferPointer { f in
                cpc_recv_with_fds(conn.raw, b.baseAddress, b.count, f.baseAddress, Int32(maxFDs), &nfds, &ctrunc)
            }
        }
        return (n, Array(buf.prefix(max(n, 0))), Array(fds.prefix(Int(min(max(nfds, 0), Int32(maxFDs))))), nfds, ctrunc != 0)
    }

    /// Reads the one handoff message: JSON bytes, the userfaultfd (the first fd)
    /// and the memory files that followed it (none in Firecracker's message).
    func receiveHandoff(_ conn: OwnedFD) throws(HandoffError) -> ([UInt8], Int32, [Int32]) {
        // The VMM sends right after connecting; a silent peer is not a VMM.
        guard cpc_poll1(conn.raw, Int16(POLLIN), Self.handoffTimeoutMs) > 0 else {
            throw .malformedJSON("no handoff message within \(Self.handoffTimeoutMs / 1000) s")
        }
        let m = Self.receiveMessage(conn, maxBytes: HandoffMessage.maxBytes)
        func closeAll() { for fd in m.fds { close(fd) } }
        if m.n < 0 { closeAll(); throw .system(SystemError("recvmsg from VMM", errno: Int32(-m.n))) }
        if m.n == 0 { closeAll(); throw .malformedJSON("the VMM closed the socket without sending its regions") }
        if Int(m.nfds) > Self.maxFDs || m.truncated { closeAll(); throw .tooManyFileDescriptors(Int(m.nfds)) }
        guard m.nfds >= 1 else { throw .noFileDescriptor }
        return (m.bytes, m.fds[0], Array(m.fds.dropFirst()))
    }

    /// The top-level JSON objects of `bytes`, in order (braces counted outside
    /// strings); empty when they are not a sequence of whole objects.
    public static func jsonObjects(_ bytes: [UInt8]) -> [[UInt8]] {
        var out: [[UInt8]] = []
        var depth = 0, start = -1, inString = false, escaped = false
        for (i, b) in bytes.enumerated() {
            if inString {
                if escaped { escaped = false } else if b == UInt8(ascii: "\\") { escaped = true } else if b == UInt8(ascii: "\"") { inString = false }
                continue
            }
            switch b {
            case UInt8(ascii: "\""): guard depth > 0 else { return [] }; inString = true
            case UInt8(ascii: "{"):
                if depth == 0 { start = i }
                depth += 1
            case UInt8(ascii: "}"):
                guard depth > 0 else { return [] }
                depth -= 1
                if depth == 0 { out.append(Array(bytes[start...i])) }
            case UInt8(ascii: " "), UInt8(ascii: "\n"), UInt8(ascii: "\r"), UInt8(ascii: "\t"): break
            default: guard depth > 0 else { return [] }
            }
        }
        return depth == 0 && !inString ? out : []
    }

    /// A later message from the VMM: the guest enabling async page faults
    /// (sets `apf`), asking to be told when every page is in (sets
    /// `notify`), or saying the recorded work is done (`RecordEnd`). False at
    /// EOF: the VMM is gone.
    func receiveLaterMessage(_ conn: OwnedFD, pid: Int32, engine: PostcopyEngine, apf: inout APFChannel?, notify: inout Bool) -> Bool {
        let m = Self.receiveMessage(conn, maxBytes: Self.laterMessageMaxBytes)
        if m.n <= 0 && m.n != -Int(EAGAIN) && m.n != -Int(EINTR) { return false }
        let got = m.fds
        // The socket is a stream: two messages sent back to back (the notice
        // request, then the APF channel with its fds) may arrive as one read.
        var bytes = m.bytes
        let parts = Self.jsonObjects(bytes)
        if parts.count > 1 || (m.nfds == 0 && parts.count == 1) {
            var rest: [[UInt8]] = []
            for p in parts {
                if CompletionNotice.isRequest(p) {
                    notify = true
                    logger.info("VMM pid \(pid): will be told when every page is in")
                } else if RecordEnd.isRequest(p) {
                    engine.endRecording()
                    logger.info("VMM pid \(pid): the recorded work is done")
                } else {
                    rest.append(p)
                }
            }
            if rest.isEmpty {
                for fd in got { close(fd) }
                return true
            }
            bytes = rest.count == 1 ? rest[0] : m.bytes
        }
        var adopted = false  // from then on the channel owns (and closes) the fds
        do throws(APFError) {
            guard apf == nil else { throw .badHeader("async page faults are already enabled for this VM") }
            try APFEnable.parse(bytes)
            guard got.count == 3, !m.truncated else { throw .badHeader("expected 3 fds (channel memfd, request eventfd, completion eventfd), got \(m.nfds)") }
            adopted = true
            apf = try APFChannel(memfd: got[0], requestFD: got[1], completionFD: got[2], engine: engine, logger: logger)
            logger.info("VMM pid \(pid): async page faults enabled")
        } catch {
            if !adopted { for fd in got { close(fd) } }
            logger.error("VMM pid \(pid): async page faults refused: \(error) (the guest keeps blocking faults)")
        }
        return true
    }
}
