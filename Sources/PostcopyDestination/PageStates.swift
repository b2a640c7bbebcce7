import CPostcopy
import PostcopyCore
import PostcopyWire
import Synchronization

/// The destination's truth about every guest page (global page numbering):
/// the received bitmap plus what is in flight. Recovery re-requests from this
/// table, so no transport keeps hidden state about pages.
///
/// States are bytes so the background scheduler can find the next missing page
/// with memchr. All transitions happen under `lock`.
final class PageStates: @unchecked Sendable {
    enum State: UInt8 {
        case missing = 0
        /// All zeros at the source: never transferred; filled with
        /// UFFDIO_ZEROPAGE if the guest touches it before completion.
        case zero = 1
        case inflightDemand = 2
        case inflightBackground = 3
        case present = 4
        /// Precopy: the bytes of a pass are in the alias (not mapped), and the
        /// source may have rewritten the page since. Until the final dirty set.
        case staged = 5
        case inflightPrecopy = 6
        /// Staged and not in the final dirty set: the alias holds the page as
        /// it was at the pause; mapping it needs no transfer (UFFDIO_CONTINUE).
        case clean = 7

        var isInflight: Bool { self == .inflightDemand || self == .inflightBackground || self == .inflightPrecopy }
    }

    let count: Int
    let lock = NSLockLite()
    private let states: UnsafeMutablePointer<UInt8>
    /// 1 once a uffd fault was seen for the page (read by guest threads, atomically).
    let faulted: UnsafeMutablePointer<UInt8>
    /// First fault time of pages guests are waiting on (for service latency).
    private var waiting: [Int: UInt64] = [:]
    /// Pages present or known zero; the migration is complete when == count.
    private(set) var settled = 0

    init(count: Int) {
        self.count = count
        missing = count
        states = .allocate(capacity: max(count, 1))
        states.initialize(repeating: 0, count: max(count, 1))
        faulted = .allocate(capacity: max(count, 1))
        faulted.initialize(repeating: 0, count: max(count, 1))
    }

    deinit {
        states.deallocate()
        faulted.deallocate()
    }

    // All methods below must be called with `lock` held.

    func state(_ p: Int) -> State { State(rawValue: states[p])! }

    func set(_ p: Int, _ s: State) {
        let old = state(p)
        let wasSettled = old == .zero || old == .present
        let isSettled = s == .zero || s == .present
        if !wasSettled && isSettled { settled += 1 }
        if wasSettled && !isSettled { settled -= 1 }
        if old == .zero { zero -= 1 }
        if s == .zero { zero += 1 }
        if old == .missing { missing -= 1 }
        if s == .missing { missing += 1 }
        if old.isInflight { inflightCount -= 1 }
        if s.isInflight { inflightCount += 1 }
        states[p] = s.rawValue
    }

    /// Pages in state zero, and missing.
    private(set) var zero = 0
    private(set) var missing: Int
    /// Pages in any in-flight state: claimed by a thread for a fetch, an
    /// install or a mapping that is not done yet, whether or not its request
    /// is registered in the engine's `inflight` table (the fault thread
    /// claims pages first and sends their requests at the end of its batch).
    private(set) var inflightCount = 0

    /// How many pages from `first` (before `end`) are in state `s`.
    func runLength(from first: Int, in s: State, end: Int) -> Int {
        var e = first
        while e < end, states[e] == s.rawValue { e += 1 }
        return e - first
    }

    /// Sets pages [first, first+count), all unsettled and in one state, to
    /// `s` in one write; when `s` settles them, returns the first-fault times
    /// of those a guest waits on.
    func setRun(_ first: Int, _ count: Int, to s: State) -> [UInt64] {
        let isSettled = s == .zero || s == .present
        if isSettled { settled += count }
        let old = state(first)
        precondition(s != .zero && s != .missing && old != .zero && old != .present && old != .missing,
                     "setRun from or to a state counted apart")
        if old.isInflight { inflightCount -= count }
        if s.isInflight { inflightCount += count }
        (states + first).initialize(repeating: s.rawValue, count: count)
        guard isSettled, !waiting.isEmpty else { return [] }
        return (first..<(first + count)).compactMap { waiting.removeValue(forKey: $0) }
    }

    func markFaulted(_ p: Int, at t: UInt64) {
        cpc_store_u8(faulted + p, 1)
        if waiting[p] == nil { waiting[p] = t }
    }

    /// Pages the VMM removed while a fetch for them was in flight: the reply
    /// for them is dropped, not treated as a protocol violation.
    private var removedInflight: Set<Int> = []

    /// UFFD_EVENT_REMOVE for page p: from now on it is zero (never fetched).
    /// A page in flight is flagged; with `keepInflight` (the continue path,
    /// whose reply may be landing in the alias right now) it also stays in
    /// flight, so nothing else writes it until the reply is in: the installer
    /// then zeroes it instead of using the reply. Returns whether it was in flight.
    @discardableResult
    func markRemoved(_ p: Int, keepInflight: Bool) -> Bool {
        let wasInflight = state(p).isInflight
        if wasInflight { removedInflight.insert(p) }
        if !(wasInflight && keepInflight) { set(p, .zero) }
        return wasInflight
    }

    /// (REMOVE events are rare: the empty set answers without hashing, as the
    /// per-page checks of every reply ask.)
    func wasRemovedInflight(_ p: Int) -> Bool { !removedInflight.isEmpty && removedInflight.contains(p) }
    func forgetRemovedInflight(_ p: Int) { removedInflight.remove(p) }

    /// The final dirty set was small: once every page is present or clean,
    /// the whole guest memory leaves the userfaultfd at once
    /// (`PrecopyReceiver.releaseAllWhenFetched`).
    var releaseAllPending = false
    /// The final dirty set was applied: the long clean runs are to leave the
    /// userfaultfd (`releaseCleanRuns`), once the stale pages' first requests left.
    var releaseRunsPending = false

    /// Faults on pages of a precopy pass (staged or in flight) before the
    /// final dirty set was applied, by fault address (their first-fault
    /// times are in `waiting`). They are handled again once it is.
    var parkedOnFinalSet: [UInt64] = []

    /// Whether a page of `range` is in state `s` (a memchr).
    func has(_ s: State, in range: Range<Int>) -> Bool {
        cpc_find_byte(UnsafePointer(states), range.lowerBound, min(range.upperBound, count), s.rawValue) >= 0
    }

    /// Whether a guest waits on page p (a fault recorded, not yet settled).
    /// (A waiter is only ever added with its page's `faulted` byte set: most
    /// pages, never faulted on, answer without a dictionary lookup.)
    func hasWaiter(_ p: Int) -> Bool { faulted[p] != 0 && !waiting.isEmpty && waiting[p] != nil }

    /// Blocks holding streamed pages left unmapped (`LazyStreamMapping.swift`),
    /// by their first page: each leaves the userfaultfd once all its pages are in.
    var heldBlocks = Set<Int>()

    /// Removes and returns the first-fault time if a guest waited on page p.
    func takeWaiter(_ p: Int) -> UInt64? { faulted[p] == 0 || waiting.isEmpty ? nil : waiting.removeValue(forKey: p) }

    /// Next missing page at or after `from` (wrapping once), or nil when none.
    func nextMissing(from: Int) -> Int? {
        // None at or after `from`: the first one, if any, is before it.
        next(.missing, from: from) ?? next(.missing, from: 0)
    }

    /// The first page at or after `from` in state `s` (no wrap), or nil.
    func next(_ s: State, from: Int) -> Int? {
        guard from < count else { return nil }
        let a = cpc_find_byte(UnsafePointer(states), from, count, s.rawValue)
        return a >= 0 ? a : nil
    }

    var isComplete: Bool { settled == count }

    /// Marks zero every page the zero maps flag that is still missing, then
    /// keeps guest pages (`unitPages` source pages each) uniform: one is zero
    /// only if all its source pages are; otherwise it is fetched whole.
    /// Returns how many pages it marked zero.
    @discardableResult
    func applyZeroMaps(_ maps: [ZeroMap], table: RegionTable, unitPages: Int) -> Int {
        let before = zero
        for z in maps {
            let first = table.firstGlobalPage[Int(z.region)] + Int(z.firstPage)
            for i in 0..<Int(z.pageCount) where z.isZero(i) && state(first + i) == .missing { set(first + i, .zero) }
        }
        guard unitPages > 1 else { return zero - before }
        for z in maps {
            let first = table.firstGlobalPage[Int(z.region)] + Int(z.firstPage)
            var u = first / unitPages * unitPages
            while u < min(first + Int(z.pageCount), count) {
                let end = min(u + unitPages, count)
                if (u..<end).contains(where: { state($0) != .zero }) {
                    for p in u..<end where state(p) == .zero { set(p, .missing) }
                }
                u = end
            }
        }
        return zero - before
    }
}
