import CPostcopy
import PostcopyCore
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// The zero pass over frozen RAM, in chunks of `chunkPages`, so that a zero
/// map waits only for the chunks it covers, not for all of RAM: a destination
/// streams the first chunks while the pass does the others.
///
/// Measured before (1 GiB kv guest, pure postcopy, 2 cores, `perf record -a`):
/// the whole pass took the first 70 ms after the pause, on one thread, and the
/// background stream, waiting for the whole zero map, sent nothing meanwhile:
/// 18 % of the time to full copy.
///
/// Two kinds of thread scan chunks: the pass's own (in address order from the
/// first chunk anybody asked for, wrapping), and a connection that asks for a
/// chunk nobody took yet (it scans it itself, at its own priority). A chunk is
/// scanned once; its bits are written before it is marked done, under a lock,
/// and read only after.
final class ZeroPass: @unchecked Sendable {
    /// 32 MiB of 4 KiB pages: a few milliseconds of scan, and a multiple of 64
    /// (no two chunks share a bitmap byte).
    static let chunkPages = 8192

    let scanner: MemoryScanner
    let pages: Int
    let chunks: Int
    /// Zero pages and hole pages (a hole is zero without a look), one bit each.
    private let zeroBytes: UnsafeMutablePointer<UInt8>
    private let holeBytes: UnsafeMutablePointer<UInt8>
    private let byteCount: Int

    private enum ChunkState: UInt8 { case todo, scanning, done }
    private struct State {
        var chunks: [ChunkState]
        var done = 0
        /// Where the pass starts: the first chunk somebody asked for.
        var start: Int?
    }
    private let state: Locked<State>

    init(scanner: MemoryScanner, delayPerChunkMicroseconds: Int = 0) {
        self.scanner = scanner
        self.delayPerChunkMicroseconds = delayPerChunkMicroseconds
        pages = scanner.pages
        chunks = (pages + Self.chunkPages - 1) / Self.chunkPages
        byteCount = max((pages + 7) / 8, 1)
        zeroBytes = .allocate(capacity: byteCount)
        zeroBytes.initialize(repeating: 0, count: byteCount)
        holeBytes = .allocate(capacity: byteCount)
        holeBytes.initialize(repeating: 0, count: byteCount)
        state = Locked(State(chunks: Array(repeating: .todo, count: chunks)))
    }

    deinit {
        zeroBytes.deallocate()
        holeBytes.deallocate()
    }

    var isDone: Bool { state.withLock { $0.done == chunks } }

    /// Tests only: the pass's own thread waits this long before each chunk (a
    /// slow pass; a connection asking for a chunk still scans it at once).
    let delayPerChunkMicroseconds: Int
    private let cancelled = Atomic<Bool>(false)

    /// The pass's own thread: every chunk nobody took, from the first one asked
    /// for on; returns once every chunk is done (some by other threads), or
    /// false when cancelled first.
    func runAll() -> Bool {
        let start = state.withLock { $0.start ?? 0 }
        for i in 0..<chunks {
            var waited = 0
            while waited < delayPerChunkMicroseconds {
                if cancelled.load(ordering: .relaxed) { return false }
                usleep(10_000)
                waited += 10_000
            }
            _ = scan(chunk: (start + i) % chunks)
        }
        waitDone(0..<chunks)
        return true
    }

    /// Ends a slowed pass early (its memory is going away).
    func cancel() { cancelled.store(true, ordering: .relaxed) }

    /// Whether global page `p` is zero; the chunks of [first, first+count)
    /// are scanned (or waited for) first.
    func zeroBits(first: Int, count: Int) -> (Int) -> Bool {
        guard count > 0 else { return { _ in false } }
        let range = (first / Self.chunkPages)...((first + count - 1) / Self.chunkPages)
        state.withLock { if $0.start == nil { $0.start = range.lowerBound } }
        for c in range { _ = scan(chunk: c) }
        waitDone(range)
        let bytes = zeroBytes
        return { p in bytes[p >> 3] & (1 << UInt8(p & 7)) != 0 }
    }

    /// The whole result, once `runAll` returned.
    func result() -> (zeros: PageBitmap, holes: PageBitmap) {
        precondition(isDone, "the zero pass is not done")
        return (PageBitmap(bytes: Array(UnsafeBufferPointer(start: zeroBytes, count: (pages + 7) / 8))),
                PageBitmap(bytes: Array(UnsafeBufferPointer(start: holeBytes, count: (pages + 7) / 8))))
    }

    /// Scans chunk `c` if nobody took it; false if somebody did.
    private func scan(chunk c: Int) -> Bool {
        let mine: Bool = state.withLock {
            guard $0.chunks[c] == .todo else { return false }
            $0.chunks[c] = .scanning
            return true
        }
        guard mine else { return false }
        let first = c * Self.chunkPages
        let end = min(first + Self.chunkPages, pages)
        scanner.zeroBits(pages: first..<end, zeros: zeroBytes, holes: holeBytes)
        state.withLock {
            $0.chunks[c] = .done
            $0.done += 1
        }
        return true
    }

    /// Waits until the chunks in `range` are done (another thread scans them).
    private func waitDone(_ range: some Sequence<Int>) {
        for c in range {
            while state.withLock({ $0.chunks[c] != .done }) { usleep(50) }
        }
    }
}
