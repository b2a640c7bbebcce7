import PostcopyHandoff
import Testing

/// The guest's side, as a test double (the real one is the guest's C library).
private struct GuestEnd {
    let mem: UnsafeMutableRawBufferPointer
    let layout: APFLayout
    func u32(_ o: Int) -> UInt32 { mem.loadUnaligned(fromByteOffset: o, as: UInt32.self) }
    func put(_ o: Int, _ v: UInt32) { mem.storeBytes(of: v, toByteOffset: o, as: UInt32.self) }
    func post(_ r: APFRequest) {
        let p = u32(64)
        let o = layout.requestOffset + Int(p & (layout.requestEntries - 1)) * 32
        mem.storeBytes(of: r.token, toByteOffset: o, as: UInt64.self)
        mem.storeBytes(of: r.address, toByteOffset: o + 8, as: UInt64.self)
        mem.storeBytes(of: r.vcpu, toByteOffset: o + 16, as: UInt32.self)
        mem.storeBytes(of: r.flags, toByteOffset: o + 20, as: UInt32.self)
        put(64, p &+ 1)
    }
    func takeCompletions() -> [(UInt64, UInt32)] {
        var c = u32(224)
        var out: [(UInt64, UInt32)] = []
        while c != u32(192) {
            let o = layout.completionOffset + Int(c & (layout.completionEntries - 1)) * 16
            out.append((mem.loadUnaligned(fromByteOffset: o, as: UInt64.self), mem.loadUnaligned(fromByteOffset: o + 8, as: UInt32.self)))
            c &+= 1
        }
        put(224, c)
        return out
    }
}

@Suite("APF shared rings")
struct APFRingTests {
    func channel(_ req: UInt32 = 8, _ comp: UInt32 = 8) -> (UnsafeMutableRawBufferPointer, APFLayout) {
        let size = APFLayout.bytesNeeded(requestEntries: req, completionEntries: comp)
        let mem = UnsafeMutableRawBufferPointer.allocate(byteCount: size, alignment: 64)
        mem.initializeMemory(as: UInt8.self, repeating: 0)
        let l = APFLayout(requestEntries: req, completionEntries: comp, size: size)
        l.writeHeader(into: mem)
        return (mem, l)
    }

    @Test func everyRequestOnceEveryCompletionOnceAcrossWrapAround() throws {
        let (mem, l) = channel()
        defer { mem.deallocate() }
        #expect(try APFLayout.parse(UnsafeRawBufferPointer(mem)) == l)
        var d = APFDaemonRing(layout: l, memory: mem)
        let g = GuestEnd(mem: mem, layout: l)
        var seen: [UInt64] = []
        var completed: [UInt64] = []
        for round in 0..<50 {  // 300 requests through an 8-entry ring
            for i in 0..<6 { g.post(APFRequest(token: UInt64(round * 6 + i), address: 4096 * UInt64(i), vcpu: 1)) }
            let rs = try d.takeRequests(max: 100)
            seen += rs.map(\.token)
            #expect(try d.postCompletions(rs.map { ($0.token, UInt32(0)) }[...]) == rs.count)
            completed += g.takeCompletions().map(\.0)
        }
        #expect(seen == Array(0..<300))
        #expect(completed == Array(0..<300))
    }

    @Test func aFullCompletionRingKeepsTheRestForLater() throws {
        let (mem, l) = channel(8, 4)
        defer { mem.deallocate() }
        var d = APFDaemonRing(layout: l, memory: mem)
        let g = GuestEnd(mem: mem, layout: l)
        let all = (0..<6).map { (token: UInt64($0), status: UInt32(0)) }
        #expect(try d.postCompletions(all[...]) == 4)
        #expect(try d.postCompletions(all[4...]) == 0)
        #expect(g.takeCompletions().map(\.0) == [0, 1, 2, 3])
        #expect(try d.postCompletions(all[4...]) == 2)
        #expect(g.takeCompletions().map(\.0) == [4, 5])
    }

    @Test func hostileIndicesAreRefused() throws {
        let (mem, l) = channel()
        defer { mem.deallocate() }
        var d = APFDaemonRing(layout: l, memory: mem)
        let g = GuestEnd(mem: mem, layout: l)
        g.put(64, 9)  // 9 requests "posted" into an 8-entry ring
        #expect(throws: APFError.self) { _ = try d.takeRequests(max: 100) }
        g.put(64, 0)
        g.put(224, 5)  // consumed completions that were never produced
        #expect(throws: APFError.self) { _ = try d.postCompletions([(token: 1, status: UInt32(0))][...]) }
    }

    @Test func hostileHeadersAreRefused() {
        let (mem, l) = channel()
        defer { mem.deallocate() }
        let raw = UnsafeRawBufferPointer(mem)
        func refused(_ edit: () -> Void) -> Bool {
            l.writeHeader(into: mem)
            edit()
            return (try? APFLayout.parse(raw)) == nil
        }
        #expect(refused { mem.storeBytes(of: UInt32(0), toByteOffset: 0, as: UInt32.self) })            // magic
        #expect(refused { mem.storeBytes(of: UInt16(2), toByteOffset: 4, as: UInt16.self) })            // version
        #expect(refused { mem.storeBytes(of: UInt32(6), toByteOffset: 8, as: UInt32.self) })            // not a power of two
        #expect(refused { mem.storeBytes(of: UInt32(1 << 20), toByteOffset: 12, as: UInt32.self) })     // too large
        #expect(refused { mem.storeBytes(of: UInt32(8), toByteOffset: 16, as: UInt32.self) })           // inside the header
        #expect(refused { mem.storeBytes(of: UInt32(l.size - 8), toByteOffset: 20, as: UInt32.self) })  // past the end
        #expect(refused { mem.storeBytes(of: UInt32(l.requestOffset + 32), toByteOffset: 20, as: UInt32.self) })  // overlap
        #expect((try? APFLayout.parse(UnsafeRawBufferPointer(rebasing: raw[0..<100]))) == nil)         // short
        l.writeHeader(into: mem)
        #expect((try? APFLayout.parse(raw)) == l)
    }
}
