import CPostcopy
import PostcopyCore
import PostcopyDestination
import Synchronization
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// A thread reading one byte of a guest view; records the value once it gets
/// past its fault.
private final class Reader: Sendable {
    private final class Cell: Sendable { let value = Atomic<Int>(-1) }
    private let cell = Cell()
    let thread: PThread
    init(_ address: UInt64) {
        let cell = self.cell
        thread = PThread(name: "guest-reader") {
            cell.value.store(Int(cpc_load_u8(UnsafePointer<UInt8>(bitPattern: UInt(address))!)), ordering: .releasing)
        }
    }
    var value: Int { cell.value.load(ordering: .acquiring) }
    var done: Bool { value >= 0 }
}

/// The kernel contract the CONTINUE install path stands on, checked directly:
/// a memfd mapped twice (guest view registered MISSING | MINOR, the daemon's
/// alias), on this machine's kernel.
@Suite("UFFDIO_CONTINUE on shared memory", .serialized, .enabled(if: minorSkipReason == nil, "MINOR faults on shmem unavailable (reason printed above)"))
struct ContinueContractTests {
    let page = MemoryMapping.systemPageSize

    /// Waits for the next page fault on `uffd`; returns its address and flags.
    func nextFault(_ uffd: Userfaultfd) throws -> (address: UInt64, flags: UInt64) {
        let msgs = UnsafeMutablePointer<uffd_msg>.allocate(capacity: 1)
        defer { msgs.deallocate() }
        #expect(cpc_poll1(uffd.fd.raw, Int16(POLLIN), 10_000) == 1, "no fault within 10 s")
        let n = try uffd.readEvents(msgs, max: 1)
        try #require(n == 1 && msgs[0].event == CPC_UFFD_EVENT_PAGEFAULT)
        return (msgs[0].arg.pagefault.address, msgs[0].arg.pagefault.flags)
    }

    @Test(.timeLimit(.minutes(1)))
    func aliasWrittenPageFaultsMinorAndMapsWithContinueAHoleFaultsMissing() throws {
        let uffd = try Userfaultfd(features: CPC_UFFD_FEATURE_MINOR_SHMEM)
        let shared = try MemoryMapping.sharedMemfd(length: 8 * page, name: "contract")
        let alias = try shared.alias()
        try uffd.registerMissingAndMinor(shared.guest.range)
        defer { try? uffd.unregisterAndWake(shared.guest.range) }

        // Page 0: written through the alias (allocated in the page cache).
        alias.base.storeBytes(of: 0xA5, toByteOffset: 0, as: UInt8.self)
        let minorReader = Reader(shared.guest.address)
        let minor = try nextFault(uffd)
        #expect(minor.address == shared.guest.address)
        #expect(minor.flags & CPC_UFFD_PAGEFAULT_FLAG_MINOR != 0, "a page in the page cache faults MINOR")
        // The reader is parked on its fault: the alias's byte is invisible until CONTINUE.
        #expect(!minorReader.done)
        #expect(try uffd.continue(at: shared.guest.address, length: page) == .done)
        minorReader.thread.join()
        #expect(minorReader.value == 0xA5)
        // Mapped already: a second CONTINUE reports EEXIST.
        #expect(try uffd.continue(at: shared.guest.address, length: page) == .exists(bytes: 0))

        // Page 1: never allocated, a hole: faults MISSING and takes UFFDIO_COPY.
        let missingReader = Reader(shared.guest.address + UInt64(page))
        let missing = try nextFault(uffd)
        #expect(missing.address == shared.guest.address + UInt64(page))
        #expect(missing.flags & CPC_UFFD_PAGEFAULT_FLAG_MINOR == 0, "a hole faults MISSING")
        let src = try MemoryMapping.anonymous(length: page)
        src.base.storeBytes(of: 0x3C, toByteOffset: 0, as: UInt8.self)
        #expect(try uffd.copy(to: shared.guest.address + UInt64(page), from: src.base, length: page) == .done)
        missingReader.thread.join()
        #expect(missingReader.value == 0x3C)
        #expect(alias.base.load(fromByteOffset: page, as: UInt8.self) == 0x3C, "COPY into shmem lands in the file")

        // Punching page 0 out of the file zaps the guest's mapping: faults MISSING again.
        #expect(cpc_fallocate_punch_hole(shared.file.raw, 0, Int64(page)) == 0)
        let afterPunch = Reader(shared.guest.address)
        let again = try nextFault(uffd)
        #expect(again.address == shared.guest.address && again.flags & CPC_UFFD_PAGEFAULT_FLAG_MINOR == 0)
        #expect(try uffd.zeropage(at: shared.guest.address, length: page) == .done)
        afterPunch.thread.join()
        #expect(afterPunch.value == 0)
    }

    /// After `populateWrite()` every page of the file is in the page cache: a
    /// touch faults MINOR, and CONTINUE alone maps the (zero) page.
    @Test(.timeLimit(.minutes(1)))
    func preallocatedPagesFaultMinorAndReadZeroAfterContinue() throws {
        let uffd = try Userfaultfd(features: CPC_UFFD_FEATURE_MINOR_SHMEM)
        let shared = try MemoryMapping.sharedMemfd(length: 4 * page, name: "contract-prealloc")
        let alias = try shared.alias()
        try alias.populateWrite(chunk: 2 * page)
        try uffd.registerMissingAndMinor(shared.guest.range)
        defer { try? uffd.unregisterAndWake(shared.guest.range) }
        let target = shared.guest.address + UInt64(3 * page)
        let reader = Reader(target + 17)
        let fault = try nextFault(uffd)
        #expect(fault.address & ~UInt64(page - 1) == target)
        #expect(fault.flags & CPC_UFFD_PAGEFAULT_FLAG_MINOR != 0)
        #expect(try uffd.continue(at: target, length: page) == .done)
        reader.thread.join()
        #expect(reader.value == 0)
    }
}
