import PostcopyCore
import PostcopyTransport
import PostcopyWire

/// How the background thread learns which pages are zero at the source (a zero
/// map: those are never sent), when that was not known at start.
public struct ZeroMapProvider: Sendable {
    /// Waits until the source can serve pages (its guest paused). Demand faults
    /// are served meanwhile.
    public let ready: @Sendable () throws(TransportError) -> Void
    /// The zero map of `pageCount` pages of `region` from `firstPage`; nil when
    /// the source has none to give (every page is then fetched).
    public let fetch: (@Sendable (_ region: UInt16, _ firstPage: UInt64, _ pageCount: UInt64) throws(TransportError) -> ZeroMap)?

    public init(ready: @escaping @Sendable () throws(TransportError) -> Void,
                fetch: (@Sendable (UInt16, UInt64, UInt64) throws(TransportError) -> ZeroMap)?) {
        self.ready = ready
        self.fetch = fetch
    }
}

/// The zero map in chunks, each fetched when the background stream first gets
/// there, so that the stream starts as soon as the source paused instead of
/// after the source scanned all of RAM for zero pages (its own chunks come
/// first: `ZeroPass` on the source).
///
/// Measured before (1 GiB kv guest, pure postcopy, loopback TCP, 2 cores): the
/// whole map was fetched first, and the stream sent nothing for the 70 ms the
/// source's scan took: 18 % of the time to full copy.
struct ZeroMapChunks {
    /// 32 MiB of 4 KiB pages (whole guest pages).
    static let chunkPages = 8192

    /// In global page order: where each chunk starts, its region and page there, its length.
    let chunks: [(global: Int, region: UInt16, page: UInt64, count: Int)]
    private(set) var known: [Bool]
    /// Chunks per fetch: 1 first (the stream starts after a few milliseconds
    /// of scan at the source), doubling up to `maxPerFetch` (the source's own
    /// pass is ahead by then).
    var perFetch = 1
    static let maxPerFetch = 16

    init(table: RegionTable, unitPages: Int) {
        let size = (Self.chunkPages + unitPages - 1) / unitPages * unitPages
        var out: [(global: Int, region: UInt16, page: UInt64, count: Int)] = []
        for r in 0..<table.regions.count {
            let pages = table.pageCount(region: r)
            for first in stride(from: 0, to: pages, by: size) {
                out.append((table.firstGlobalPage[r] + first, UInt16(r), UInt64(first), min(size, pages - first)))
            }
        }
        chunks = out
        known = Array(repeating: false, count: out.count)
    }

    /// The chunk holding global page `p`.
    func index(of p: Int) -> Int { chunks.lastIndex(startingAtOrBefore: p) { $0.global } }

    /// The end (exclusive) of the known chunks from chunk `i` on.
    func knownEnd(from i: Int) -> Int {
        var e = i
        while e + 1 < chunks.count, known[e + 1] { e += 1 }
        return chunks[e].global + chunks[e].count
    }

    mutating func markKnown(_ i: Int) { known[i] = true }
}

/// What `zeroMapSpan` found.
enum ZeroMapSpan {
    /// Claim in [first, end).
    case span(first: Int, end: Int)
    /// The next missing page's zero map is not known yet: drain the channel first.
    case waitForIdle
    case noneMissing
}

extension PostcopyEngine {
    /// Where the background stream may claim next: from the first missing page
    /// at or after `cursor` (wrapping) to the end of the chunks whose zero map
    /// is known from there on. Fetches and applies the map of the chunk that
    /// page is in first if it is not known yet (on this thread: a round trip on
    /// the control connection; the source scans that chunk first), and lowers
    /// `zeroCursor` to it (zero pages mapped ahead).
    /// The request goes on the main connection, which carries the background
    /// stream over TCP: only when `channelIdle` (nothing in flight on it).
    func zeroMapSpan(from cursor: Int, _ chunks: inout ZeroMapChunks, zeroCursor: inout Int,
                     channelIdle: Bool) throws(TransportError) -> ZeroMapSpan {
        assert(backgroundThread.isCurrent)
        while true {
            guard let found = pages.lock.withLock({ pages.nextMissing(from: cursor) }) else { return .noneMissing }
            let i = chunks.index(of: found)
            if chunks.known[i] { return .span(first: found, end: chunks.knownEnd(from: i)) }
            guard channelIdle else { return .waitForIdle }
            let c = chunks.chunks[i]
            // The unknown chunks that follow in the region, up to `perFetch`:
            // each fetch drains the stream's pipe once.
            var n = 1, count = c.count
            while n < chunks.perFetch, i + n < chunks.chunks.count, !chunks.known[i + n], chunks.chunks[i + n].region == c.region {
                count += chunks.chunks[i + n].count
                n += 1
            }
            if let fetch = zeroMapProvider?.fetch {
                let map = try fetch(c.region, c.page, UInt64(count))
                guard map.region == c.region, map.firstPage == c.page, map.pageCount == UInt64(count) else {
                    throw .protocolViolation("zero map for region \(map.region) pages \(map.firstPage)+\(map.pageCount), asked for \(c.region) \(c.page)+\(count)")
                }
                let complete: Bool = pages.lock.withLock {
                    // Counted as they become known: those of earlier chunks may be mapped already.
                    counters.zeroPagesKnown.add(pages.applyZeroMaps([map], table: table, unitPages: unitPages), ordering: .relaxed)
                    counters.settledPages.store(pages.settled, ordering: .relaxed)
                    return pages.isComplete
                }
                if complete { markComplete(at: nowNanoseconds()) }
                if zeroCursor < table.totalPages || config.installZeroPagesAhead { zeroCursor = min(zeroCursor, c.global) }
            }
            for k in i..<(i + n) { chunks.markKnown(k) }
            chunks.perFetch = min(chunks.perFetch * 2, ZeroMapChunks.maxPerFetch)
        }
    }

    /// Before streaming: waits until the source can serve pages (reconnecting
    /// after a connection loss). False when the source went away after every
    /// page was already in: nothing is left to stream.
    func waitForSource(_ provider: ZeroMapProvider, generation: inout Int,
                       background: inout PageChannel) throws(TransportError) -> Bool {
        while true {
            do {
                try provider.ready()
                return true
            } catch {
                if try recover(from: generation, cause: error) == .sourceDone { return false }
                let now = currentChannels()
                generation = now.generation
                if let b = now.background { background = b }
            }
        }
    }
}
