import CPostcopy
import Foundation
import Logging
import PostcopyCore
import PostcopyDestination
import PostcopySource
import PostcopyTransport
import PostcopyWire
import Testing

/// Why userfaultfd tests cannot run here, or nil when they can. Probed once.
let uffdSkipReason: String? = {
    let r = Userfaultfd.unavailableReason()
    if let r { print("SKIP (integration tests need userfaultfd): \(r)") }
    return r
}()

/// Why the CONTINUE install path cannot run here (no MINOR faults on shmem), or nil. Probed once.
let minorSkipReason: String? = {
    let r = uffdSkipReason ?? Userfaultfd.unavailableReason(minorShmem: true)
    if let r { print("SKIP (the continue install path needs UFFD_FEATURE_MINOR_SHMEM): \(r)") }
    return r
}()

/// True (after printing why) when a test of `install` cannot run on this kernel.
func skipped(_ install: InstallMode, _ test: String = #function) -> Bool {
    guard install == .continue, let reason = minorSkipReason else { return false }
    print("SKIP \(test) with --install continue: \(reason)")
    return true
}

func testLogger(_ label: String) -> Logger {
    var l = Logger(label: label)
    // POSTCOPY_TEST_LOG=debug|info|... for diagnosis.
    l.logLevel = ProcessInfo.processInfo.environment["POSTCOPY_TEST_LOG"].flatMap { Logger.Level(rawValue: $0) } ?? .error
    return l
}

/// A memory file in /dev/shm, removed when the value is released.
final class TempMemory {
    let path: String
    let file: MemoryFile
    let mapping: MemoryMapping

    init(size: Int, zeroPercent: Int = 20, seed: UInt64 = 7) throws {
        path = "/dev/shm/postcopy-test-\(getpid())-\(UInt64.random(in: 0...UInt64.max)).ram"
        try MemoryFile.create(path: path, size: size, pageSize: 4096, zeroPercent: zeroPercent, seed: seed)
        file = try MemoryFile.open(path)
        mapping = try MemoryMapping.file(fd: file.fd.raw, length: size, writable: false)
    }

    deinit { unlink(path) }
}

/// A source page server on an ephemeral loopback port.
func startServer(_ mem: TempMemory, deviceState: [UInt8] = [], exitAfterCompletion: Bool = false) throws -> PageServer {
    let sm = try SourceMemory(file: mem.file, pageSize: 4096, deviceState: deviceState)
    let server = try PageServer(memory: sm, listen: Endpoint(host: "127.0.0.1", port: 0),
                                exitAfterCompletion: exitAfterCompletion, logger: testLogger("test.source"))
    server.start()
    return server
}

/// Byte-compares destination RAM against the source file; returns the first
/// differing offset, or nil when every byte is equal.
final class ByteComparison: @unchecked Sendable {
    let expected: UnsafeRawBufferPointer
    private let lock = NSLockLite()
    private var _firstDifference: Int? = -1

    init(expected: UnsafeRawBufferPointer) { self.expected = expected }

    var firstDifference: Int? { lock.withLock { _firstDifference } }

    /// Whether `bytes` differ from the expected ones at byte `offset`.
    func differs(at offset: Int, _ bytes: UnsafeRawBufferPointer) -> Bool {
        offset + bytes.count > expected.count || memcmp(bytes.baseAddress!, expected.baseAddress! + offset, bytes.count) != 0
    }

    func check(_ regions: [UnsafeRawBufferPointer]) {
        var diff: Int? = nil
        if regions.count != 1 || regions[0].count != expected.count {
            diff = 0
        } else if memcmp(regions[0].baseAddress!, expected.baseAddress!, expected.count) != 0 {
            diff = zip(regions[0], expected).enumerated().first { $0.element.0 != $0.element.1 }?.offset ?? 0
        }
        lock.withLock { _firstDifference = diff }
    }
}

func runDestination(port: Int, touch: TouchMode, threads: Int, background: Bool = true,
                    install: InstallMode = .copy, prefetch: PrefetchMode = .adaptive,
                    compare: ByteComparison? = nil, replay: WorkingSet? = nil, rate: Int = 0) throws -> DestinationReport {
    var options = DestinationOptions()
    options.engine.backgroundRate = rate
    options.engine.replayWorkingSet = replay
    options.engine.prefetch = prefetch
    options.install = install
    options.touch = touch
    options.threads = threads
    options.engine.background = background
    if let compare { options.inspect = { compare.check($0) } }
    let dest = StandaloneDestination(options: options, logger: testLogger("test.dest"))
    let transport = TCPTransport(endpoint: Endpoint(host: "127.0.0.1", port: port), maxBatchPages: options.engine.batchPages)
    return try dest.run(transport: transport, transportReason: "test")
}

/// Raw client for hostile-peer tests.
func rawConnect(_ port: Int) throws -> TCPConnection {
    try TCPConnection.connect(Endpoint(host: "127.0.0.1", port: port), maxBody: 1 << 20)
}

/// Reads until the peer closes; returns the frames seen (an error frame ends the list).
func drainUntilClosed(_ c: TCPConnection) -> (frames: [MessageType], error: ErrorMessage?, closed: Bool) {
    var types: [MessageType] = []
    while true {
        do {
            let m = try c.receive(timeoutMs: 10_000)
            types.append(m.type)
        } catch {
            switch error {
            case .peer(let e):
                let closed = (try? c.receive(timeoutMs: 10_000)) == nil
                return (types, e, closed)
            case .closed: return (types, nil, true)
            default: return (types, nil, false)
            }
        }
    }
}
