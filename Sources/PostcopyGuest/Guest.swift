import CPostcopy
import Foundation
import PostcopyCore
import Synchronization

/// The reference guest: vCPU threads running a workload over guest RAM at
/// `base`. It can pause at a safe point (between two operations), hand out its
/// device state, and resume from one over other memory.
public final class ReferenceGuest: @unchecked Sendable {
    public let base: UnsafeMutableRawPointer
    public let memoryBytes: Int
    public let workload: Workload
    /// The page size of the guest's memory (the unit of `pages` and dirty tracking).
    public let pageSize: Int
    /// One slot per vCPU, written only by that vCPU's thread.
    private let states: UnsafeMutableBufferPointer<VCPUState>
    private let zipf: Zipf?
    private let pauseFlag = Atomic<Bool>(false)
    private let opsCounter = Atomic<UInt64>(0)
    private let failures = Atomic<UInt64>(0)
    private let parked = Atomic<Int>(0)
    private let go: EventFD
    private var threads: [PThread] = []
    /// One byte per page (destination only): 0 never written since resuming,
    /// 1 its pre-write digest is being taken, 2 written (digest in `preWrite`).
    public let dirty: UnsafeMutablePointer<UInt8>?
    /// xxh64 of each page just before the guest first wrote it at the
    /// destination: the page as it arrived, i.e. as it was at the source at pause.
    private let preWrite: UnsafeMutablePointer<UInt64>?
    private let tracking: MemoryMapping?
    /// One byte per page the guest touched while `recording` (destination,
    /// during postcopy: how many distinct pages it wanted before every page was in).
    private let touchLog: MemoryMapping?
    private let recording = Atomic<Bool>(false)
    public var pages: Int { memoryBytes / pageSize }

    /// Skew of the zipf distributions (kv keys, zipf page touches).
    public let zipfSkew: Double
    /// Percent of operations that write (see `Workload.defaultWritePercent`).
    public let writePercent: Int

    /// A guest over `base`, memory made of `pageSize` pages (by default the host's:
    /// an anonymous mapping's). `trackDirty` records every page the guest writes.
    public init(base: UnsafeMutableRawPointer, memoryBytes: Int, workload: Workload, vcpus: [VCPUState], trackDirty: Bool,
                zipfSkew: Double = 0.99, writePercent: Int? = nil, pageSize: Int = MemoryMapping.systemPageSize,
                recordTouches: Bool = false) throws {
        self.zipfSkew = zipfSkew
        self.writePercent = writePercent ?? workload.defaultWritePercent
        self.base = base
        self.memoryBytes = memoryBytes
        self.pageSize = pageSize
        self.workload = workload
        states = .allocate(capacity: vcpus.count)
        _ = states.initialize(from: vcpus)
        switch workload {
        case .zipf: zipf = Zipf(n: memoryBytes / pageSize, theta: zipfSkew)
        case .kv: zipf = Zipf(n: max(1, KVLayout.slotCount(memoryBytes: memoryBytes) / max(vcpus.count, 1)), theta: zipfSkew)
        default: zipf = nil
        }
        go = try EventFD()
        // Zero-filled lazily, like the dirty map.
        touchLog = recordTouches ? try MemoryMapping.anonymous(length: max(memoryBytes / pageSize, 1)) : nil
        recording.store(recordTouches, ordering: .relaxed)
        if trackDirty {
            // Zero-filled lazily by the kernel: resuming must not wait for a memset
            // proportional to RAM size.
            let pages = memoryBytes / pageSize
            let digestsAt = (pages + 7) & ~7
            tracking = try MemoryMapping.anonymous(length: digestsAt + pages * 8)
            dirty = tracking!.base.bindMemory(to: UInt8.self, capacity: pages)
            preWrite = (tracking!.base + digestsAt).bindMemory(to: UInt64.self, capacity: pages)
        } else {
            tracking = nil
            dirty = nil
            preWrite = nil
        }
    }

    deinit { states.deallocate() }

    public static func freshVCPUs(_ n: Int, seed: UInt64) -> [VCPUState] {
        (0..<n).map { VCPUState(rng: seed &+ UInt64($0) &* 0x9E37_79B9_7F4A_7C15, cursor: 0, ops: 0) }
    }

    /// Fills `fillPercent` of the key-value slots (the guest "boots" with data);
    /// the rest of RAM stays zero.
    public func populate(fillPercent: Int, seed: UInt64) {
        base.storeBytes(of: KVLayout.magic, as: UInt64.self)
        let slots = KVLayout.slotCount(memoryBytes: memoryBytes) * fillPercent / 100
        nonisolated(unsafe) let b = base
        let workers = (0..<2).map { w in
            PThread(name: "populate") {
                var rng = SplitMix64(seed: seed &+ UInt64(w))
                var s = w
                while s < slots {
                    KVLayout.set(b + KVLayout.headerBytes + s * KVLayout.slotSize, key: UInt64(s), rng: &rng)
                    s += 2
                }
            }
        }
        workers.forEach { $0.join() }
    }

    public var totalOps: UInt64 { opsCounter.load(ordering: .relaxed) }
    public var integrityFailures: UInt64 { failures.load(ordering: .relaxed) }

    /// Starts the vCPU threads; they wait for `release()` before the first operation.
    public func start() {
        let n = states.count
        for t in 0..<n {
            threads.append(PThread(name: "vcpu\(t)") { [self] in
                while cpc_poll1(go.fd.raw, Int16(POLLIN), 1000) == 0 {}
                var st = states[t]
                run(t, n, &st)
                states[t] = st
                parked.add(1, ordering: .acquiringAndReleasing)
            })
        }
    }

    /// Lets the vCPUs run (the "first instruction"); returns CLOCK_MONOTONIC then.
    @discardableResult
    public func release() -> UInt64 {
        let t = nowNanoseconds()
        go.signal()
        return t
    }

    /// Stops every vCPU at a safe point and returns the device state.
    public func pause(pausedAt: UInt64) -> GuestDeviceState {
        pauseFlag.store(true, ordering: .releasing)
        for t in threads { t.join() }
        return GuestDeviceState(workload: workload, memoryBytes: memoryBytes, vcpus: Array(states), pausedAtNs: pausedAt,
                                integrityFailures: failures.load(ordering: .relaxed), zipfSkew: zipfSkew, writePercent: writePercent)
    }

    /// Before the first write to a page at the destination, digest it as it
    /// arrived; other vCPUs writing the same page wait for that digest.
    @inline(__always) private func markDirty(_ offset: Int) {
        guard let dirty, let preWrite else { return }
        let p = offset / pageSize
        let flag = dirty + p
        if cpc_load_u8(flag) == 2 { return }
        if cpc_cas_u8(flag, 0, 1) != 0 {
            preWrite[p] = cpc_xxh64(base + p * pageSize, pageSize, 0)
            cpc_store_u8(flag, 2)
        } else {
            while cpc_load_u8(flag) != 2 {}
        }
    }

    private func run(_ t: Int, _ n: Int, _ st: inout VCPUState) {
        var rng = SplitMix64(seed: st.rng)
        let slots = KVLayout.slotCount(memoryBytes: memoryBytes)
        let mine = max(1, (slots - t + n - 1) / n)  // slots t, t+n, t+2n, ...
        let pageCount = memoryBytes / pageSize
        var local: UInt64 = 0
        let writes = UInt64(writePercent)
        // The pause is seen within 16 operations (a few microseconds). Measured
        // here, pause to every vCPU joined, 6 runs each: 0.15-0.74 ms with
        // checks every 64 operations, 0.17-0.30 ms every 16.
        while !pauseFlag.load(ordering: .relaxed) {
            let log = recording.load(ordering: .relaxed) ? touchLog?.base.assumingMemoryBound(to: UInt8.self) : nil
            for _ in 0..<16 {
                switch workload {
                case .kv:
                    let u = Double(rng.next() >> 11) / Double(1 << 53)
                    let s = t + min(zipf!.next(u), mine - 1) * n
                    guard s < slots else { continue }
                    let off = KVLayout.headerBytes + s * KVLayout.slotSize
                    if let log { cpc_store_u8(log + off / pageSize, 1) }
                    if rng.next() % 100 < writes {
                        markDirty(off)
                        KVLayout.set(base + off, key: UInt64(s), rng: &rng)
                    } else if KVLayout.verify(base + off, expectedKey: UInt64(s)) == false {
                        failures.add(1, ordering: .relaxed)
                    }
                case .scan:
                    let share = (pageCount + n - 1) / n
                    let p = t * share + st.cursor % max(share, 1)
                    if p < pageCount {
                        _ = cpc_touch_read(base + p * pageSize)
                        if let log { cpc_store_u8(log + p, 1) }
                    }
                    st.cursor += 1
                case .random:
                    let p = Int(rng.next() % UInt64(pageCount))
                    touch(p, &rng, writes)
                    if let log { cpc_store_u8(log + p, 1) }
                case .zipf:
                    let u = Double(rng.next() >> 11) / Double(1 << 53)
                    let p = zipf!.next(u)
                    touch(p, &rng, writes)
                    if let log { cpc_store_u8(log + p, 1) }
                }
                local += 1
            }
            opsCounter.add(16, ordering: .relaxed)
        }
        st.ops &+= local
        var tmp = rng
        st.rng = tmp.next()  // continue from a fresh point of the same stream
    }

    /// Reads page `p`, or (`writes` percent of the time) writes one of its bytes.
    @inline(__always) private func touch(_ p: Int, _ rng: inout SplitMix64, _ writes: UInt64) {
        let r = rng.next()
        if writes > 0 && r % 100 < writes {
            markDirty(p * pageSize)
            cpc_guest_write_u8((base + p * pageSize + Int((r >> 8) % UInt64(pageSize))).assumingMemoryBound(to: UInt8.self), UInt8(truncatingIfNeeded: r >> 32))
        } else {
            _ = cpc_touch_read(base + p * pageSize)
        }
    }

    /// Stops recording touched pages (every page is in: the rest is no longer
    /// postcopy's business); returns how many distinct pages were touched.
    @discardableResult
    public func stopRecordingTouches() -> Int {
        recording.store(false, ordering: .relaxed)
        return touchedPages
    }

    /// Distinct pages touched while recording (0 without `recordTouches`).
    public var touchedPages: Int {
        guard let log = touchLog else { return 0 }
        let b = log.base.assumingMemoryBound(to: UInt8.self)
        var n = 0
        for p in 0..<pages where cpc_load_u8(b + p) != 0 { n += 1 }
        return n
    }

    /// After the run: checks every key-value slot's checksum.
    public func verifyStore() -> (verified: Int, failed: Int) {
        guard workload == .kv else { return (0, 0) }
        var ok = 0, bad = 0
        for s in 0..<KVLayout.slotCount(memoryBytes: memoryBytes) {
            switch KVLayout.verify(base + KVLayout.headerBytes + s * KVLayout.slotSize, expectedKey: UInt64(s)) {
            case true?: ok += 1
            case false?: bad += 1
            case nil: break
            }
        }
        return (ok, bad)
    }

    /// Compares every page with the source's page digests at pause: a page the
    /// guest has not written since resuming as it is now, a written one by the
    /// digest taken just before its first write at the destination.
    /// `firstMismatched`: the numbers of the first 16 pages that differ (for diagnosis).
    public func verifyPages(against digests: [UInt64]) -> (verified: Int, verifiedBeforeWrite: Int, mismatched: Int, firstMismatched: [Int]) {
        var ok = 0, beforeWrite = 0, bad = 0
        var first: [Int] = []
        for p in 0..<min(pages, digests.count) {
            let h: UInt64
            if let dirty, let preWrite, cpc_load_u8(dirty + p) == 2 {
                h = preWrite[p]
                beforeWrite += 1
            } else {
                h = cpc_xxh64(base + p * pageSize, pageSize, 0)
            }
            if h == digests[p] {
                ok += 1
            } else {
                bad += 1
                if first.count < 16 { first.append(p) }
            }
        }
        if digests.count != pages { bad += abs(pages - digests.count) }
        return (ok, beforeWrite, bad, first)
    }
}
