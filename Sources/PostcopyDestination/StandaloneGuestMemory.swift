import CPostcopy
import PostcopyCore
import PostcopyWire

/// Guest RAM of a standalone destination, one mapping per source region, laid
/// out for its install path:
/// - copy: anonymous memory registered MISSING;
/// - continue: a memfd per region, its guest view registered MISSING | MINOR and
///   the daemon's alias of it, preallocated (`MADV_POPULATE_WRITE`) before any
///   page streams, so no allocation or zeroing is left for the postcopy window.
struct StandaloneGuestMemory {
    let mode: InstallMode
    /// The guest's views, in source region order.
    let guest: [MemoryMapping]
    let regions: [GuestRegion]
    /// The daemon's aliases (continue only), in the same order.
    let aliases: [MemoryMapping]
    /// The memory files (continue only): they live as long as the mappings.
    let files: [OwnedFD]
    let preallocationNanoseconds: UInt64
    /// Per file (continue only): it held no data before preallocation.
    let zeroAtStart: [Bool]

    /// The uffd features a run in `mode` needs from UFFDIO_API.
    static func uffdFeatures(_ mode: InstallMode) -> UInt64 {
        mode == .continue ? CPC_UFFD_FEATURE_MINOR_SHMEM : 0
    }

    init(table: RegionTable, mode: InstallMode, uffd: Userfaultfd) throws(SystemError) {
        self.mode = mode
        var guest: [MemoryMapping] = [], aliases: [MemoryMapping] = [], files: [OwnedFD] = []
        var regions: [GuestRegion] = []
        for (i, r) in table.regions.enumerated() {
            let m: MemoryMapping
            switch mode {
            case .copy:
                m = try MemoryMapping.anonymous(length: Int(r.size))
                try uffd.registerMissing(m.range)
            case .continue:
                let shared = try MemoryMapping.sharedMemfd(length: Int(r.size), name: "guest-ram-\(i)")
                m = shared.guest
                try uffd.registerMissingAndMinor(m.range)
                aliases.append(try shared.alias())
                files.append(shared.file)
            }
            guest.append(m)
            regions.append(GuestRegion(base: m.address, size: m.length, sourceFirstPage: table.firstGlobalPage[i]))
        }
        zeroAtStart = aliases.indices.map { MemoryFile.rangeIsHole(files[$0].raw, offset: 0, length: aliases[$0].length) }
        let t0 = nowNanoseconds()
        for a in aliases { try a.populateWrite() }
        preallocationNanoseconds = aliases.isEmpty ? 0 : nowNanoseconds() - t0
        (self.guest, self.aliases, self.files, self.regions) = (guest, aliases, files, regions)
    }

    var installPath: InstallPath {
        switch mode {
        case .copy: .copy
        case .continue:
            .continue(aliases: (0..<guest.count).map {
                SharedAlias(guestBase: guest[$0].address, aliasBase: aliases[$0].address, fileFD: files[$0].raw, fileOffset: 0,
                            zeroAtStart: zeroAtStart[$0])
            })
        }
    }

    /// Guest RAM as resident-memory accounting must leave it out: the guest
    /// views and the aliases of them.
    var excludedRanges: [Range<UInt64>] { (guest + aliases).map(\.range) }
}
