import PostcopyWire

/// One precopy pass's pages as the destination uses them: the chunks of a
/// `DirtySet` answer checked against the session and put together.
public struct PrecopySet: Sendable, Equatable {
    public var pass: UInt32
    /// The source guest paused: these pages are the final dirty set.
    public var isFinal: Bool
    /// Global pages, sorted and disjoint.
    public var runs: [Range<Int>]
    public var decision: String

    public var pageCount: Int { runs.reduce(0) { $0 + $1.count } }

    public init(pass: UInt32, isFinal: Bool, runs: [Range<Int>], decision: String) {
        self.pass = pass
        self.isFinal = isFinal
        self.runs = runs
        self.decision = decision
    }

    /// Reads the answer to pass `pass` from `next` (one `DirtySet` chunk per
    /// call): chunks of that pass, in order, covering pages [0, totalPages)
    /// exactly, all final or none. Anything else is a protocol violation.
    public static func receive(pass: UInt32, totalPages: Int,
                               _ next: () throws(TransportError) -> Message) throws(TransportError) -> PrecopySet {
        var runs: [Range<Int>] = []
        var covered: UInt64 = 0
        var final: Bool?
        var decision = ""
        while true {
            let m = try next()
            guard case .dirtySet(let d) = m else {
                if case .error(let e) = m { throw .peer(e) }
                throw .protocolViolation("expected the dirty set of precopy pass \(pass), got \(m.type)")
            }
            guard d.pass == pass else { throw .protocolViolation("dirty set of pass \(d.pass) in answer to pass \(pass)") }
            guard d.firstPage == covered, d.firstPage + d.pageCount <= UInt64(totalPages) else {
                throw .protocolViolation("dirty set chunk of pages \(d.firstPage)..<\(d.firstPage &+ d.pageCount) does not continue at page \(covered) of \(totalPages)")
            }
            guard final == nil || final == d.isFinal else { throw .protocolViolation("dirty set chunks disagree on being final") }
            final = d.isFinal
            decision = d.decision
            for r in d.runs {
                let lo = Int(r.lowerBound), hi = Int(r.upperBound)
                if let last = runs.last, last.upperBound == lo { runs[runs.count - 1] = last.lowerBound..<hi } else { runs.append(lo..<hi) }
            }
            covered += d.pageCount
            if d.isLastChunk {
                guard covered == UInt64(totalPages) else {
                    throw .protocolViolation("dirty set of pass \(pass) ends at page \(covered) of \(totalPages)")
                }
                return PrecopySet(pass: pass, isFinal: final ?? false, runs: runs, decision: decision)
            }
        }
    }
}
