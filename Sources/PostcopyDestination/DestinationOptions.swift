import PostcopyCore

/// How the built-in guest stand-in touches memory (until a VMM hands memory over).
public enum TouchMode: String, Sendable, CaseIterable {
    case none
    case random
    case sequential
    /// Every thread touches every page, all in the same random order: many
    /// threads fault on the same page at once (exercises fault coalescing).
    case shared
}

/// Where guest RAM lives and how received pages reach it (see `InstallPath`).
public enum InstallMode: String, Sendable, CaseIterable {
    /// Anonymous memory; pages installed with UFFDIO_COPY.
    case copy
    /// A memfd per region; the daemon writes pages into its own preallocated
    /// alias of it and maps them with UFFDIO_CONTINUE.
    case `continue`
}

public struct DestinationOptions: Sendable {
    /// The engine's knobs; `engine.installPath` is set from `install` by the run.
    public var engine = EngineConfig()
    public var install: InstallMode = .copy
    public var touch: TouchMode = .random
    public var threads = 4
    /// Guest compute between two touches, in microseconds (busy, like a vCPU running).
    public var thinkMicroseconds = 0
    public var seed: UInt64 = 1
    /// Where to write the device state received from the source (nil: keep in memory only).
    public var deviceStateOut: String?
    /// Called with guest RAM (one buffer per region) after completion, before it is unmapped.
    public var inspect: (@Sendable ([UnsafeRawBufferPointer]) -> Void)?
    /// Called by the guest stand-in with each page it touched, just after the
    /// touch (its byte offset in guest RAM, counting regions in order, and its
    /// bytes): for tests that check what the guest could read mid-migration.
    public var onTouch: (@Sendable (Int, UnsafeRawBufferPointer) -> Void)?
    public init() {}
}
