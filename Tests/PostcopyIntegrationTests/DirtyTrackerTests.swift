import CPostcopy
import Foundation
import PostcopyCore
import PostcopySource
import Synchronization
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// Why async write-protect tracking cannot run here, or nil. Probed once.
let dirtyTrackingSkipReason: String? = {
    if let r = uffdSkipReason { return r }
    do {
        let m = try MemoryMapping.anonymous(length: 1 << 20)
        _ = try WriteProtectTracker(base: m.base, length: m.length, pageSize: 4096)
        return nil
    } catch {
        print("SKIP (dirty tracking needs async userfaultfd write-protect): \(error)")
        return "\(error)"
    }
}()

enum TrackedMemory: String, CaseIterable, Sendable {
    case anonymous
    case shared

    func map(_ length: Int) throws -> (MemoryMapping, SharedMemory?) {
        switch self {
        case .anonymous: return (try MemoryMapping.anonymous(length: length), nil)
        case .shared:
            let s = try MemoryMapping.sharedMemfd(length: length, name: "dirty-test")
            return (s.guest, s)
        }
    }
}

@Suite("DirtyPages runs") struct DirtyPagesTests {
    @Test func runsAreSortedMergedAndSearchable() {
        let d = DirtyPages(runs: [9..<12, 0..<2, 2..<3, 20..<21, 10..<15, 5..<5])
        #expect(d.runs == [0..<3, 9..<15, 20..<21])
        #expect(d.count == 10)
        #expect([0, 2, 9, 14, 20].allSatisfy { d.contains($0) })
        #expect(![3, 8, 15, 19, 21, -1].contains { d.contains($0) })
        #expect(DirtyPages().isEmpty)
    }
}

/// The tracker on the real kernel: async write-protect + PAGEMAP_SCAN.
@Suite("Dirty tracking by async write-protect", .serialized,
       .enabled(if: dirtyTrackingSkipReason == nil, "async userfaultfd write-protect unavailable (reason printed above)"))
struct DirtyTrackerTests {
    @Test(arguments: TrackedMemory.allCases)
    func writtenPagesAreFoundOnceAndProtectedAgain(memory: TrackedMemory) throws {
        let pageSize = 4096, pages = 8192
        let (m, shared) = try memory.map(pages * pageSize)
        defer { withExtendedLifetime(shared) {} }
        // Half the pages exist before tracking starts, half are never touched.
        for p in stride(from: 0, to: pages / 2, by: 1) { (m.base + p * pageSize).storeBytes(of: UInt64(p), as: UInt64.self) }
        let tracker = try WriteProtectTracker(base: m.base, length: m.length, pageSize: pageSize)
        #expect(try tracker.collect().isEmpty, "nothing was written since tracking began")
        var rng = SplitMix64(seed: 3)
        var written = Set<Int>()
        for _ in 0..<500 {
            let p = Int(rng.next() % UInt64(pages))
            (m.base + p * pageSize + Int(rng.next() % 512) * 8).storeBytes(of: rng.next(), as: UInt64.self)
            written.insert(p)
        }
        #expect(written.contains { $0 < pages / 2 } && written.contains { $0 >= pages / 2 })
        let first = try tracker.collect()
        #expect(first.count == written.count)
        #expect(written.allSatisfy { first.contains($0) })
        #expect(try tracker.collect().isEmpty, "the scan protects what it reports again")
        (m.base + 77 * pageSize).storeBytes(of: 1, as: UInt8.self)
        #expect(try tracker.collect().runs == [77..<78])
        // Reading is not writing.
        _ = (m.base + 100 * pageSize).load(as: UInt64.self)
        _ = (m.base + (pages - 1) * pageSize).load(as: UInt64.self)
        #expect(try tracker.collect().isEmpty)
    }

    /// Precopy's invariant: copy everything once, then, until the writer stops,
    /// copy again whatever each collect reports; a last collect after it stopped.
    /// The copy must then equal memory byte for byte: a write that raced with a
    /// scan or a copy and was lost would leave a stale page.
    @Test(.timeLimit(.minutes(2)), arguments: TrackedMemory.allCases)
    func aRacingWriterIsNeverLost(memory: TrackedMemory) throws {
        let pageSize = 4096, pages = 4096
        let (m, shared) = try memory.map(pages * pageSize)
        defer { withExtendedLifetime(shared) {} }
        // Half the pages exist before tracking starts, half are never touched.
        memset(m.base, 1, m.length / 2)
        let tracker = try WriteProtectTracker(base: m.base, length: m.length, pageSize: pageSize)
        let copy = try MemoryMapping.anonymous(length: m.length)
        let stop = Atomic<Bool>(false)
        let writes = Atomic<Int>(0)
        nonisolated(unsafe) let base = m.base
        let writer = PThread(name: "dirty-writer") {
            var rng = SplitMix64(seed: 17)
            var n = 0
            while !stop.load(ordering: .relaxed) {
                let p = Int(rng.next() % UInt64(pages))
                // Skewed: a hot eighth of the pages takes most writes.
                let q = n % 4 == 0 ? p : p % (pages / 8)
                (base + q * pageSize + Int(rng.next() % 512) * 8).storeBytes(of: rng.next(), as: UInt64.self)
                n += 1
                if n % 1024 == 0 { writes.store(n, ordering: .relaxed) }
            }
            writes.store(n, ordering: .relaxed)
        }
        memcpy(copy.base, m.base, m.length)  // pass 1: everything
        var passes = 0, recopied = 0
        let deadline = nowNanoseconds() + 300_000_000
        while nowNanoseconds() < deadline {
            let dirty = try tracker.collect()
            for r in dirty.runs { memcpy(copy.base + r.lowerBound * pageSize, m.base + r.lowerBound * pageSize, r.count * pageSize) }
            passes += 1
            recopied += dirty.count
        }
        stop.store(true, ordering: .relaxed)
        writer.join()
        let last = try tracker.collect()
        for r in last.runs { memcpy(copy.base + r.lowerBound * pageSize, m.base + r.lowerBound * pageSize, r.count * pageSize) }
        #expect(writes.load(ordering: .relaxed) > 10_000, "the writer must really race the scans")
        #expect(passes > 3 && recopied > 0)
        let firstStale = (0..<pages).first { memcmp(copy.base + $0 * pageSize, m.base + $0 * pageSize, pageSize) != 0 }
        #expect(firstStale == nil, "page \(firstStale ?? -1) changed after its last copy and no collect reported it")
    }
}
