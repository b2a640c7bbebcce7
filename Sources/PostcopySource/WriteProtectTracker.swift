import CPostcopy
import PostcopyCore
#if canImport(Glibc)
import Glibc
#endif

/// Dirty tracking by userfaultfd write-protect in async mode (Linux 6.7): the
/// range is registered `UFFDIO_REGISTER_MODE_WP` on a userfaultfd opened with
/// `UFFD_FEATURE_WP_ASYNC | WP_UNPOPULATED | WP_HUGETLBFS_SHMEM` and protected
/// once; a write then only clears the page's protection, in the kernel, with
/// no fault message and no thread to answer it. `collect` is one
/// `PAGEMAP_SCAN` walk (`PM_SCAN_WP_MATCHING`) that reports the pages whose
/// protection is gone and protects them again in the same walk, under the page
/// table lock: a write after the walk passed a page clears it again and is in
/// the next set. Works on anonymous memory, memfd/shmem and hugetlbfs; pages
/// never touched yet are tracked too (`WP_UNPOPULATED`).
public final class WriteProtectTracker: DirtyTracker, @unchecked Sendable {
    public let pageSize: Int
    public let pageCount: Int
    /// How long protecting took (all pieces so far).
    public var protectNanoseconds: UInt64 { lock.withLock { protectedFor } }
    private var protectedFor: UInt64 = 0  // under lock
    private let start: UInt64
    private let length: Int
    private let uffd: OwnedFD
    private let pagemap: OwnedFD
    private let lock = NSLockLite()
    private var stopped = false  // under lock
    private let vec: UnsafeMutablePointer<cpc_page_region>
    private static let vecLength = 4096

    public static let features = CPC_UFFD_FEATURE_WP_ASYNC | CPC_UFFD_FEATURE_WP_UNPOPULATED | CPC_UFFD_FEATURE_WP_HUGETLBFS_SHMEM

    /// Registers `length` bytes at `base` (page-aligned; a mapping of this
    /// process that no other userfaultfd watches for write-protect) and, with
    /// `trackingAll`, starts tracking all of it (else: `startTracking`).
    public init(base: UnsafeMutableRawPointer, length: Int, pageSize: Int, trackingAll: Bool = true) throws(SystemError) {
        guard length > 0, length % pageSize == 0, Int(bitPattern: base) % pageSize == 0 else {
            throw SystemError("dirty tracking of \(length) bytes at \(base) with \(pageSize)-byte pages: not page-aligned", errno: EINVAL)
        }
        self.pageSize = pageSize
        pageCount = length / pageSize
        start = UInt64(UInt(bitPattern: base))
        self.length = length
        var viaDevice: Int32 = 0
        let fd = OwnedFD(try sysCall("userfaultfd for dirty tracking") { cpc_uffd_open(O_CLOEXEC | O_NONBLOCK, &viaDevice) })
        uffd = fd
        let first = start
        var features: UInt64 = 0, ioctls: UInt64 = 0
        let api = cpc_uffd_api(fd.raw, Self.features, &features, &ioctls)
        guard api == 0, features & Self.features == Self.features else {
            throw SystemError("UFFDIO_API with UFFD_FEATURE_WP_ASYNC | WP_UNPOPULATED | WP_HUGETLBFS_SHMEM (async write-protect dirty tracking needs Linux 6.7 or later)",
                              errno: api < 0 ? -api : EOPNOTSUPP)
        }
        var rangeIoctls: UInt64 = 0
        _ = try sysCall("UFFDIO_REGISTER (write-protect) of \(length) bytes") {
            cpc_uffd_register(fd.raw, first, UInt64(length), CPC_UFFDIO_REGISTER_MODE_WP, &rangeIoctls)
        }
        guard rangeIoctls & CPC_IOCTL_BIT_WRITEPROTECT != 0 else {
            throw SystemError("UFFDIO_REGISTER offers no UFFDIO_WRITEPROTECT on this memory", errno: EOPNOTSUPP)
        }
        pagemap = OwnedFD(try sysCall("open /proc/self/pagemap") { cpc_pagemap_open() })
        vec = .allocate(capacity: Self.vecLength)
        if trackingAll { try startTracking(pages: 0..<pageCount) }
    }

    public func startTracking(pages: Range<Int>) throws(SystemError) {
        guard !pages.isEmpty else { return }
        precondition(pages.lowerBound >= 0 && pages.upperBound <= pageCount, "pages \(pages) outside the tracked range")
        let (fd, at, len) = (uffd.raw, start + UInt64(pages.lowerBound * pageSize), UInt64(pages.count * pageSize))
        try lock.withLock { () throws(SystemError) in
            guard !stopped else { throw SystemError("dirty tracking was stopped", errno: EBADF) }
            let t0 = nowNanoseconds()
            _ = try sysCall("UFFDIO_WRITEPROTECT of \(len) bytes") { cpc_uffd_writeprotect(fd, at, len, 1) }
            protectedFor += nowNanoseconds() - t0
        }
    }

    deinit {
        // Closing the userfaultfd drops the registration and the protection.
        vec.deallocate()
    }

    public func stop() {
        lock.withLock {
            stopped = true
            uffd.close()  // the registration and the protection go with it
        }
    }

    public func collect(pages: Range<Int>) throws(SystemError) -> DirtyPages { try scan(pages, reprotect: true) }

    public func peek(pages: Range<Int>) throws(SystemError) -> DirtyPages { try scan(pages, reprotect: false) }

    /// Pages never protected count as written (they are not protected): ask
    /// only about tracked ones.
    private func scan(_ pages: Range<Int>, reprotect: Bool) throws(SystemError) -> DirtyPages {
        guard !pages.isEmpty else { return DirtyPages() }
        precondition(pages.lowerBound >= 0 && pages.upperBound <= pageCount, "pages \(pages) outside the tracked range")
        return try lock.withLock { () throws(SystemError) -> DirtyPages in
            guard !stopped else { throw SystemError("dirty tracking was stopped", errno: EBADF) }
            // A walk may stop before `end` (the vector full, or the kernel's
            // own reasons: seen on 6.18 under CPU load with the vector far from
            // full) and goes on from `walk_end`. The runs of those walks may
            // overlap or come out of order: they are sorted and merged, never
            // assumed in order (assuming it lost pages in the racing-writer test).
            var found: [Range<Int>] = []
            let end = start + UInt64(pages.upperBound * pageSize)
            var from = start + UInt64(pages.lowerBound * pageSize)
            while from < end {
                var walkEnd: UInt64 = 0
                let n = try sysCall("PAGEMAP_SCAN of written pages") {
                    cpc_pagemap_scan_written(pagemap.raw, from, end, vec, UInt64(Self.vecLength), &walkEnd, reprotect ? 1 : 0)
                }
                for i in 0..<Int(n) {
                    let first = Int((vec[i].start - start) / UInt64(pageSize))
                    let last = Int((vec[i].end - start + UInt64(pageSize) - 1) / UInt64(pageSize))
                    found.append(first..<last)
                }
                guard walkEnd > from else {
                    // Never silently: pages after `from` would go unreported.
                    throw SystemError("PAGEMAP_SCAN stopped at 0x\(String(walkEnd, radix: 16)) without progress from 0x\(String(from, radix: 16))", errno: EIO)
                }
                from = walkEnd
            }
            return DirtyPages(runs: found)
        }
    }
}
