import CPostcopy
import PostcopyCore
#if canImport(Glibc)
import Glibc
#endif

/// Owner of one userfaultfd (Linux `userfaultfd(2)`, `/dev/userfaultfd`).
/// One small method per ioctl, as in QEMU's util/userfaultfd.c.
public final class Userfaultfd: Sendable {
    public let fd: OwnedFD
    /// Features the kernel granted in UFFDIO_API.
    public let features: UInt64
    /// How the fd was obtained ("/dev/userfaultfd" or "syscall").
    public let origin: String

    /// Wraps a uffd that someone else (a VMM) created and already negotiated.
    public init(adopting fd: Int32, features: UInt64 = 0) {
        self.fd = OwnedFD(fd)
        self.features = features
        origin = "handed over"
    }

    /// Opens a uffd (device first, then the syscall), non-blocking and
    /// close-on-exec, and negotiates `features` with UFFDIO_API; checks that
    /// REGISTER/UNREGISTER are offered.
    public init(features requested: UInt64 = 0) throws(SystemError) {
        var viaDev: Int32 = 0
        let raw = try sysCall("userfaultfd (via /dev/userfaultfd and the syscall)") {
            cpc_uffd_open(O_CLOEXEC | O_NONBLOCK, &viaDev)
        }
        fd = OwnedFD(raw)
        origin = viaDev != 0 ? "/dev/userfaultfd" : "syscall"
        var granted: UInt64 = 0, ioctls: UInt64 = 0
        _ = try sysCall("UFFDIO_API") { cpc_uffd_api(raw, requested, &granted, &ioctls) }
        let needed = CPC_IOCTL_BIT_REGISTER | CPC_IOCTL_BIT_UNREGISTER
        guard ioctls & needed == needed else {
            throw SystemError("UFFDIO_API: kernel does not offer REGISTER/UNREGISTER (ioctls 0x\(String(ioctls, radix: 16)))", errno: ENOTSUP)
        }
        if requested & CPC_UFFD_FEATURE_MINOR_SHMEM != 0, granted & CPC_UFFD_FEATURE_MINOR_SHMEM == 0 {
            throw SystemError("UFFDIO_API: this kernel does not offer UFFD_FEATURE_MINOR_SHMEM (MINOR faults on shared memory, Linux 5.14+), needed to install pages with UFFDIO_CONTINUE", errno: ENOTSUP)
        }
        guard granted & requested == requested else {
            throw SystemError("UFFDIO_API: features 0x\(String(requested & ~granted, radix: 16)) not granted", errno: ENOTSUP)
        }
        features = granted
    }

    /// UFFDIO_REGISTER in MISSING mode; checks COPY, ZEROPAGE and WAKE are allowed
    /// on the range (hugetlbfs has no ZEROPAGE: pass `hugetlb`).
    public func registerMissing(_ range: Range<UInt64>, hugetlb: Bool = false) throws(SystemError) {
        var ioctls: UInt64 = 0
        _ = try sysCall("UFFDIO_REGISTER(MISSING) 0x\(String(range.lowerBound, radix: 16))+\(range.count)") {
            cpc_uffd_register(fd.raw, range.lowerBound, UInt64(range.count), CPC_UFFDIO_REGISTER_MODE_MISSING, &ioctls)
        }
        let needed = CPC_IOCTL_BIT_COPY | CPC_IOCTL_BIT_WAKE | (hugetlb ? 0 : CPC_IOCTL_BIT_ZEROPAGE)
        guard ioctls & needed == needed else {
            throw SystemError("UFFDIO_REGISTER: range does not allow COPY/ZEROPAGE/WAKE (ioctls 0x\(String(ioctls, radix: 16)))", errno: ENOTSUP)
        }
    }

    /// UFFDIO_REGISTER in MISSING | MINOR mode, for shared memory (shmem) the
    /// uffd was opened for with `CPC_UFFD_FEATURE_MINOR_SHMEM`: a page in the page
    /// cache but not mapped here faults MINOR, a hole faults MISSING. Checks that
    /// CONTINUE, COPY and WAKE are allowed on the range.
    public func registerMissingAndMinor(_ range: Range<UInt64>) throws(SystemError) {
        var ioctls: UInt64 = 0
        _ = try sysCall("UFFDIO_REGISTER(MISSING|MINOR) 0x\(String(range.lowerBound, radix: 16))+\(range.count)") {
            cpc_uffd_register(fd.raw, range.lowerBound, UInt64(range.count),
                              CPC_UFFDIO_REGISTER_MODE_MISSING | CPC_UFFDIO_REGISTER_MODE_MINOR, &ioctls)
        }
        let needed = CPC_IOCTL_BIT_CONTINUE | CPC_IOCTL_BIT_COPY | CPC_IOCTL_BIT_WAKE
        guard ioctls & needed == needed else {
            throw SystemError("UFFDIO_REGISTER(MINOR): range does not allow CONTINUE/COPY/WAKE (ioctls 0x\(String(ioctls, radix: 16)))", errno: ENOTSUP)
        }
    }

    public func unregister(_ range: Range<UInt64>) throws(SystemError) {
        _ = try sysCall("UFFDIO_UNREGISTER") { cpc_uffd_unregister(fd.raw, range.lowerBound, UInt64(range.count)) }
    }

    /// Unregisters `range` and then wakes every thread still parked on it.
    /// UFFDIO_UNREGISTER wakes waiters itself, but before it clears the VMA: a
    /// thread woken there can fault again on the still-registered VMA and park
    /// with nobody left to read its message (seen here about once in 30 runs with
    /// 4 guest threads). A wake after the unregister returns catches it; its retry
    /// then takes an ordinary fault.
    public func unregisterAndWake(_ range: Range<UInt64>) throws(SystemError) {
        try unregister(range)
        wake(range.lowerBound, length: range.count)
    }

    /// Outcome of one UFFDIO_COPY / UFFDIO_ZEROPAGE / UFFDIO_CONTINUE.
    public enum FillResult: Equatable, Sendable {
        /// All bytes installed (threads waiting on them are woken).
        case done
        /// Some page in the range is already present; `bytes` were installed before it.
        case exists(bytes: Int)
        /// Try again: a partial fill of `bytes`, or a pending remove / mm change (EAGAIN).
        case again(bytes: Int)
    }

    private func classify(_ r: Int32, _ n: Int64, _ what: String) throws(SystemError) -> FillResult {
        if r == 0 { return .done }
        let partial = n > 0 ? Int(n) : 0
        if r == -EEXIST { return .exists(bytes: partial) }
        if r == -EAGAIN { return .again(bytes: partial) }
        throw SystemError(what, errno: -r)
    }

    /// UFFDIO_COPY of `len` bytes from `src` to guest address `dst`.
    public func copy(to dst: UInt64, from src: UnsafeRawPointer, length len: Int) throws(SystemError) -> FillResult {
        var n: Int64 = 0
        let r = cpc_uffd_copy(fd.raw, dst, src, UInt64(len), 0, &n)
        return try classify(r, n, "UFFDIO_COPY 0x\(String(dst, radix: 16))+\(len)")
    }

    /// UFFDIO_ZEROPAGE of `len` bytes at `dst`.
    public func zeropage(at dst: UInt64, length len: Int) throws(SystemError) -> FillResult {
        var n: Int64 = 0
        let r = cpc_uffd_zeropage(fd.raw, dst, UInt64(len), 0, &n)
        return try classify(r, n, "UFFDIO_ZEROPAGE 0x\(String(dst, radix: 16))+\(len)")
    }

    /// UFFDIO_CONTINUE of `len` bytes at `dst`: maps pages whose bytes are already
    /// in the page cache (written through an alias) into a MINOR-registered range.
    /// `.exists`: some page is mapped already (the caller wakes); `.again`: partial,
    /// or a remove pending.
    public func `continue`(at dst: UInt64, length len: Int) throws(SystemError) -> FillResult {
        var n: Int64 = 0
        let r = cpc_uffd_continue(fd.raw, dst, UInt64(len), 0, &n)
        return try classify(r, n, "UFFDIO_CONTINUE 0x\(String(dst, radix: 16))+\(len)")
    }

    /// UFFDIO_WAKE: wakes threads faulting on a range that is already filled.
    public func wake(_ dst: UInt64, length len: Int) {
        _ = cpc_uffd_wake(fd.raw, dst, UInt64(len))
    }

    /// Reads pending events into `buffer`; returns how many (0 when none).
    public func readEvents(_ buffer: UnsafeMutablePointer<uffd_msg>, max: Int) throws(SystemError) -> Int {
        let r = cpc_uffd_read_msgs(fd.raw, buffer, Int32(max))
        if r == -EAGAIN { return 0 }
        if r < 0 { throw SystemError("read(userfaultfd)", errno: -r) }
        return Int(r)
    }

    /// Whether this kernel lets this process create a userfaultfd; nil if yes,
    /// else the reason (for tests that must skip, and for clear CLI errors).
    public static func unavailableReason(minorShmem: Bool = false) -> String? {
        do {
            _ = try Userfaultfd(features: minorShmem ? CPC_UFFD_FEATURE_MINOR_SHMEM : 0)
            return nil
        } catch {
            return "userfaultfd unavailable: \(error) (needs CONFIG_USERFAULTFD and root, /dev/userfaultfd access or vm.unprivileged_userfaultfd=1)"
        }
    }
}
