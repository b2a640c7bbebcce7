import CPostcopy
import PostcopyCore
import Testing
@testable import PostcopyGuest

@Suite("reference guest")
struct GuestTests {
    @Test func keyValueChecksumsCatchCorruption() throws {
        let ram = try MemoryMapping.anonymous(length: 1 << 20)
        let guest = try ReferenceGuest(base: ram.base, memoryBytes: ram.length, workload: .kv,
                                       vcpus: ReferenceGuest.freshVCPUs(2, seed: 1), trackDirty: false)
        guest.populate(fillPercent: 50, seed: 9)
        let before = guest.verifyStore()
        #expect(before.failed == 0)
        #expect(before.verified == KVLayout.slotCount(memoryBytes: ram.length) / 2)
        // Flip one byte of one value: exactly that slot must fail.
        let victim = ram.base + KVLayout.headerBytes + 7 * KVLayout.slotSize + 40
        victim.storeBytes(of: victim.load(as: UInt8.self) ^ 0x01, as: UInt8.self)
        let after = guest.verifyStore()
        #expect(after.failed == 1)
        #expect(after.verified == before.verified - 1)
    }

    @Test func deviceStateRoundTrips() throws {
        let s = GuestDeviceState(workload: .zipf, memoryBytes: 1 << 30,
                                 vcpus: [VCPUState(rng: 1, cursor: 2, ops: 3), VCPUState(rng: .max, cursor: 0, ops: 9)],
                                 pausedAtNs: 123_456_789, integrityFailures: 0)
        let bytes = s.encoded()
        #expect(try GuestDeviceState.decode(bytes) == s)
        #expect(throws: (any Error).self) { _ = try GuestDeviceState.decode(Array("{\"workload\":\"nope\"}".utf8)) }
        // Every truncation, a trailing byte, and garbage in each field are refused, never trusted.
        for cut in 0..<bytes.count {
            #expect(throws: GuestDeviceState.DecodeError.self) { _ = try GuestDeviceState.decode(Array(bytes.prefix(cut))) }
        }
        #expect(throws: GuestDeviceState.DecodeError.self) { _ = try GuestDeviceState.decode(bytes + [0]) }
        var rng = SplitMix64(seed: 9)
        for _ in 0..<2000 {
            var b = bytes
            b[Int(rng.next() % UInt64(b.count))] = UInt8(truncatingIfNeeded: rng.next())
            _ = try? GuestDeviceState.decode(b)  // an error or a state, never a crash
        }
    }

    @Test func zipfIsSkewedAndInRange() {
        let z = Zipf(n: 100_000)
        var rng = SplitMix64(seed: 4)
        var hot = 0
        for _ in 0..<100_000 {
            let v = z.next(Double(rng.next() >> 11) / Double(1 << 53))
            #expect(v >= 0 && v < 100_000)
            if v < 1000 { hot += 1 }
        }
        // With skew 0.99 the hottest 1% of keys draw well over a third of the accesses.
        #expect(hot > 35_000, "hot share \(hot)")
    }

    /// Pause, then resume from the device state: the workload goes on and the
    /// pre-write digests match the memory as it was at the pause.
    @Test(.timeLimit(.minutes(1)))
    func pauseAndResumeKeepIntegrity() throws {
        let ram = try MemoryMapping.anonymous(length: 2 << 20)
        let guest = try ReferenceGuest(base: ram.base, memoryBytes: ram.length, workload: .kv,
                                       vcpus: ReferenceGuest.freshVCPUs(2, seed: 5), trackDirty: false)
        guest.populate(fillPercent: 75, seed: 5)
        guest.start()
        guest.release()
        while guest.totalOps < 100_000 {}
        let state = guest.pause(pausedAt: nowNanoseconds())
        #expect(state.vcpus.allSatisfy { $0.ops > 0 })
        let atPause = (0..<(ram.length / 4096)).map { cpc_xxh64(ram.base + $0 * 4096, 4096, 0) }

        let resumed = try ReferenceGuest(base: ram.base, memoryBytes: ram.length, workload: state.workload,
                                         vcpus: state.vcpus, trackDirty: true)
        resumed.start()
        resumed.release()
        while resumed.totalOps < 100_000 {}
        _ = resumed.pause(pausedAt: nowNanoseconds())
        #expect(resumed.verifyStore().failed == 0)
        #expect(resumed.integrityFailures == 0)
        let check = resumed.verifyPages(against: atPause)
        #expect(check.mismatched == 0)
        #expect(check.verifiedBeforeWrite > 0, "the resumed guest wrote pages")
        #expect(check.verified == ram.length / 4096)
        #expect(check.firstMismatched.isEmpty)
        // A page that differs from the source's at pause (digests of another
        // content) is counted and named.
        var other = atPause
        other[0] &+= 1
        other[77] &+= 1
        let bad = resumed.verifyPages(against: other)
        #expect(bad.mismatched == 2)
        #expect(bad.firstMismatched == [0, 77])
    }
}
