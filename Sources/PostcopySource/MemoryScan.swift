/// What a scan of frozen guest RAM found.
public struct MemoryScan: Sendable {
    /// The all-zero pages (global numbering).
    public var zeros: ZeroPages
    /// xxh64 of every page, so a destination whose guest already runs can check
    /// the pages its guest has not written since resuming.
    public var pageDigests: [UInt64]
    /// `MemoryDigest` of all of RAM.
    public var digest: UInt64
}
