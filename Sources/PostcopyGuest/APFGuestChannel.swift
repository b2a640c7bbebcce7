import CGuestAPF
import CPostcopy
import PostcopyCore
#if canImport(Glibc)
import Glibc
#endif

/// The guest's end of a paravirtual async-page-fault channel: shared memory
/// (a memfd with the two rings) and two eventfds, ready to hand to the daemon.
public final class APFGuestChannel: @unchecked Sendable {
    public let memfd: OwnedFD
    public let requestFD: OwnedFD
    public let completionFD: OwnedFD
    let mapping: MemoryMapping
    let channel: OpaquePointer

    public init(requestEntries: UInt32 = 256, completionEntries: UInt32 = 256) throws(SystemError) {
        let bytes = apf_channel_bytes(requestEntries, completionEntries)
        let m = cpc_memfd_create("apf-channel", CPC_MFD_CLOEXEC)
        guard m >= 0 else { throw SystemError("memfd_create", errno: -m) }
        memfd = OwnedFD(m)
        guard ftruncate(m, off_t(bytes)) == 0 else { throw SystemError("ftruncate of the APF channel", errno: errno) }
        mapping = try MemoryMapping.file(fd: m, length: bytes, writable: true)
        let flags = CPC_EFD_CLOEXEC | CPC_EFD_NONBLOCK
        let r = cpc_eventfd(0, flags), c = cpc_eventfd(0, flags)
        guard r >= 0, c >= 0 else { throw SystemError("eventfd", errno: -min(r, c)) }
        requestFD = OwnedFD(r)
        completionFD = OwnedFD(c)
        guard let ch = apf_channel_create(mapping.base, bytes, requestEntries, completionEntries, r, c) else {
            throw SystemError("apf_channel_create", errno: EINVAL)
        }
        channel = ch
        _ = apf_install_handler()
    }

    deinit { apf_channel_destroy(channel) }

    /// The shared memory (for tests that play a hostile guest).
    public var mappingBase: UnsafeRawPointer { UnsafeRawPointer(mapping.base) }

    /// The fds in the order the daemon expects them (memfd, request, completion).
    public var fds: [Int32] { [memfd.raw, requestFD.raw, completionFD.raw] }
}
