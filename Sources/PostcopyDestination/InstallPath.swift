import PostcopyCore
#if canImport(Glibc)
import Glibc
#endif

/// How received pages reach the guest: the two install paths behind one
/// installer (`PageInstaller.swift`). The scheduler, the received bitmap
/// (`PageStates`), recovery and the statistics are the same for both.
public enum InstallPath: Sendable, Equatable {
    /// Anonymous guest memory: `UFFDIO_COPY` allocates and fills each page from
    /// the received bytes (zero pages: `UFFDIO_ZEROPAGE`).
    case copy
    /// Shared guest memory (memfd, shmem, hugetlbfs), registered MISSING | MINOR:
    /// the daemon writes each page into its own *alias* mapping of the same file,
    /// then `UFFDIO_CONTINUE` maps it into the guest. One alias per guest region.
    /// The aliases should be preallocated (`MemoryMapping.populateWrite()`) so no
    /// allocation is left for the postcopy window. A zero page is written as
    /// zeros through the alias, then mapped: whatever the file held before the
    /// handoff is never shown to the guest.
    case `continue`(aliases: [SharedAlias])

    public var name: String {
        switch self {
        case .copy: "copy"
        case .continue: "continue"
        }
    }
}

/// A guest region in a shared memory file, and the daemon's alias of it.
public struct SharedAlias: Sendable, Equatable {
    /// The guest's view (the address the uffd serves) and the alias's base.
    public var guestBase: UInt64
    public var aliasBase: UInt64
    /// The file (owned by the caller; it outlives the engine) and the byte
    /// offset in it of the region's first byte: `UFFD_EVENT_REMOVE` punches
    /// removed pages out of it.
    public var fileFD: Int32
    public var fileOffset: UInt64
    /// The region's file range held no data before it was preallocated (a
    /// fresh file): each alias page reads zero until the daemon writes it,
    /// since the guest cannot write a page before it is installed.
    public var zeroAtStart: Bool

    public init(guestBase: UInt64, aliasBase: UInt64, fileFD: Int32, fileOffset: UInt64, zeroAtStart: Bool = false) {
        self.guestBase = guestBase
        self.aliasBase = aliasBase
        self.fileFD = fileFD
        self.fileOffset = fileOffset
        self.zeroAtStart = zeroAtStart
    }
}

/// `InstallPath` resolved against the engine's regions, so the hot path does
/// one switch and one addition.
enum Installer: Sendable {
    case copy
    /// Per region in `RegionMap` order: alias address minus guest address, and
    /// the file range behind it (and whether it was all hole at the start).
    case `continue`(aliasDeltas: [UInt64], files: [(fd: Int32, offset: UInt64, zeroAtStart: Bool)])

    init(_ path: InstallPath, map: RegionMap) throws(SystemError) {
        switch path {
        case .copy:
            self = .copy
        case .continue(let aliases):
            var deltas: [UInt64] = []
            var files: [(fd: Int32, offset: UInt64, zeroAtStart: Bool)] = []
            for r in map.regions {
                guard let a = aliases.first(where: { $0.guestBase == r.base }) else {
                    throw SystemError("install path continue: no alias for the guest region at 0x\(String(r.base, radix: 16))", errno: EINVAL)
                }
                deltas.append(a.aliasBase &- r.base)
                files.append((a.fileFD, a.fileOffset, a.zeroAtStart))
            }
            self = .continue(aliasDeltas: deltas, files: files)
        }
    }
}
