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
    /// Shared guest memory (memfd/shmem), registered MISSING | MINOR: the daemon
    /// writes each page into its own *alias* mapping of the same file, then
    /// `UFFDIO_CONTINUE` maps it into the guest. `aliases` maps each guest
    /// region's base address to its alias's base address. The alias must be
    /// preallocated (`MemoryMapping.populateWrite()`) and zero where the source's
    /// zero pages are (a fresh memfd): a zero page is mapped by CONTINUE alone.
    case `continue`(aliases: [UInt64: UInt64])

    public var name: String {
        switch self {
        case .copy: "copy"
        case .continue: "continue"
        }
    }
}

/// `InstallPath` resolved against the engine's regions, so the hot path does
/// one switch and one addition.
enum Installer: Sendable {
    case copy
    /// Alias address minus guest address, per region in `RegionMap` order.
    case `continue`(aliasDeltas: [UInt64])

    init(_ path: InstallPath, map: RegionMap) throws(SystemError) {
        switch path {
        case .copy:
            self = .copy
        case .continue(let aliases):
            var deltas: [UInt64] = []
            for r in map.regions {
                guard let a = aliases[r.base] else {
                    throw SystemError("install path continue: no alias for the guest region at 0x\(String(r.base, radix: 16))", errno: EINVAL)
                }
                deltas.append(a &- r.base)
            }
            self = .continue(aliasDeltas: deltas)
        }
    }
}
