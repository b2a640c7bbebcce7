import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// Owns one file descriptor and closes it exactly once (on `close()` or in deinit).
public final class OwnedFD: Sendable {
    private let fd: Atomic<Int32>

    public init(_ fd: Int32) { self.fd = Atomic(fd) }

    /// The raw descriptor, or -1 once closed.
    public var raw: Int32 { fd.load(ordering: .acquiring) }

    public func close() {
        let old = fd.exchange(-1, ordering: .acquiringAndReleasing)
        if old >= 0 { _ = Glibc.close(old) }
    }

    deinit { close() }
}
