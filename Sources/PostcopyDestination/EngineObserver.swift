/// Hooks for what the engine does one event at a time, for a metrics backend
/// (the handoff daemon's Prometheus endpoint). Called on the engine's threads:
/// they must be quick and must not block.
public struct EngineObserver: Sendable {
    /// A guest thread's fault was served after this many nanoseconds.
    public var faultServed: @Sendable (UInt64) -> Void
    /// The connection to the source came back after this many nanoseconds.
    public var recovered: @Sendable (UInt64) -> Void

    public init(faultServed: @escaping @Sendable (UInt64) -> Void, recovered: @escaping @Sendable (UInt64) -> Void) {
        self.faultServed = faultServed
        self.recovered = recovered
    }
}
