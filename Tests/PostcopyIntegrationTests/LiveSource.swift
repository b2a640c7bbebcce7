import CPostcopy
import Foundation
import PostcopyCore
import PostcopyHandoff
import PostcopySource
import PostcopyTransport
import PostcopyWire
import Synchronization
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// A source guest stand-in for precopy: RAM in a memfd mapped writable, a
/// writer thread rewriting random pages while it "runs", and a pause that
/// stops the writer (after `beforePause`), then freezes RAM.
final class LiveSource: @unchecked Sendable {
    /// What the writer thread and the pause share.
    final class Guest: @unchecked Sendable {
        let base: UnsafeMutableRawPointer
        let pages: Int
        let stop = Atomic<Bool>(false)
        let writes = Atomic<UInt64>(0)
        let writer = Locked<PThread?>(nil)
        let pauseReason = Locked<String?>(nil)
        init(base: UnsafeMutableRawPointer, pages: Int) {
            self.base = base
            self.pages = pages
        }
    }
    let file: OwnedFD
    let ram: MemoryMapping
    let memory: SourceMemory
    let controller: PrecopyController
    let server: PageServer
    let pageCount: Int
    let guest: Guest

    /// `writeEvery`: µs between two page writes of the writer (0: as fast as
    /// it can; nil: no writer).
    init(size: Int, policy: PrecopyPolicy.Mode, writeEvery: UInt32?, seed: UInt64, abandonSeconds: Double = 90,
         beforePause: @escaping @Sendable (UnsafeMutableRawPointer) -> Void = { _ in }) throws {
        let shared = try MemoryMapping.sharedMemfd(length: size, name: "precopy-test-ram")
        file = shared.file
        ram = shared.guest
        pageCount = size / 4096
        // Random pages, every 8th left a hole (a zero page never written).
        var rng = SplitMix64(seed: seed)
        for p in 0..<pageCount where p % 8 != 3 {
            let page = (ram.base + p * 4096).bindMemory(to: UInt64.self, capacity: 512)
            for i in 0..<512 { page[i] = rng.next() }
        }
        memory = try SourceMemory(mapping: ram, pageSize: 4096, file: file.raw)
        let guest = Guest(base: ram.base, pages: pageCount)
        self.guest = guest
        let memory = self.memory
        controller = try PrecopyController(policy: PrecopyPolicy(mode: policy, totalPages: pageCount), memory: memory,
                                           destinationWaitSeconds: 10, abandonSeconds: abandonSeconds) { why in
            guest.pauseReason.withLock { if $0 == nil { $0 = why } }
            guest.stop.store(true, ordering: .releasing)
            guest.writer.withLock { $0 }?.join()
            beforePause(guest.base)
            memory.freeze(deviceState: Array("device state".utf8))
        }
        server = try PageServer(memory: memory, listen: Endpoint(host: "127.0.0.1", port: 0), exitAfterCompletion: false,
                                precopy: controller, logger: testLogger("test.source"))
        server.start()
        if let writeEvery {
            guest.writer.withLock {
                $0 = PThread(name: "guest-writer") {
                    var rng = SplitMix64(seed: seed ^ 0xFFFF)
                    while !guest.stop.load(ordering: .acquiring) {
                        let p = Int(rng.next() % UInt64(guest.pages))
                        (guest.base + p * 4096 + Int(rng.next() % 4096)).storeBytes(of: UInt8(truncatingIfNeeded: rng.next()), as: UInt8.self)
                        guest.writes.add(1, ordering: .relaxed)
                        if writeEvery > 0 { usleep(writeEvery) }
                    }
                }
            }
        }
    }

    var pageWrites: UInt64 { guest.writes.load(ordering: .relaxed) }

    /// RAM as it is now (after the pause: as it was at the pause).
    var contents: [UInt8] { Array(ram.bytes) }

    func close() { server.stop() }
}
