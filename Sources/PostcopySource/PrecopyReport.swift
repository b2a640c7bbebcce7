/// What a source's precopy did: pages per pass, bytes, why it stopped, the final set.
public struct PrecopyReport: Sendable, Codable, Equatable {
    public var mode: String
    /// Pages of each pass, and when each began (s after `begin`).
    public var passes: [Int]
    public var passStartSeconds: [Double]
    public var bytesSent: Int
    /// Why precopy stopped, and when (s after `begin`; 0 when the operator paused).
    public var decision: String?
    public var decisionSeconds: Double
    public var finalDirtyPages: Int?
    public var finalScanSeconds: Double
    public var protectSeconds: Double
    /// Destinations whose precopy was cancelled because they went away.
    public var abandonedDestinations: Int = 0

    enum CodingKeys: String, CodingKey {
        case mode, passes, passStartSeconds = "pass_start_seconds", bytesSent = "bytes_sent", decision
        case decisionSeconds = "decision_seconds", finalDirtyPages = "final_dirty_pages"
        case finalScanSeconds = "final_scan_seconds", protectSeconds = "protect_seconds", abandonedDestinations = "abandoned_destinations"
    }
}
