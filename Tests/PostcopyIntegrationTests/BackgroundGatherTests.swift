import PostcopyCore
@_spi(Testing) import PostcopyDestination
import PostcopySource
import PostcopyTransport
import Testing

/// The background stream asks for scattered runs of missing pages in gathers
/// (one request and one reply for a batch's worth of runs) on a channel that
/// can, instead of one request per run.
@Suite("background stream in gathers", .serialized, .enabled(if: uffdSkipReason == nil, "userfaultfd unavailable (reason printed above)"))
struct BackgroundGatherTests {
    /// Half the pages are zero, at random: the zero map leaves the non-zero
    /// pages in short runs. With no guest touching anything, every non-zero
    /// page comes by the stream, once, in gathers, and every byte is equal,
    /// on both install paths (fails on a stream that never gathers).
    @Test(.timeLimit(.minutes(1)), arguments: InstallMode.allCases)
    func scatteredRunsComeInGathers(install: InstallMode) throws {
        if skipped(install) { return }
        let mem = try TempMemory(size: 16 << 20, zeroPercent: 50, seed: 61)
        let server = try startServer(mem)
        defer { server.stop() }
        var options = DestinationOptions()
        options.install = install
        options.touch = .none
        options.engine.prefetch = .off
        let cmp = ByteComparison(expected: mem.mapping.bytes)
        options.inspect = { cmp.check($0) }
        let dest = StandaloneDestination(options: options, logger: testLogger("test.gather"))
        let r = try dest.run(transport: TCPTransport(endpoint: Endpoint(host: "127.0.0.1", port: server.port), maxBatchPages: 128),
                             transportReason: "test")
        let gathers = server.stats.gathers.load(ordering: .relaxed)
        print("background gathers (\(install)): \(gathers) gathers for \(r.nonZeroPages) non-zero pages")
        #expect(gathers > 0, "scattered runs must come in gathers")
        // A gather holds up to a batch (128 pages): far fewer than one request per run.
        #expect(gathers <= UInt64(r.nonZeroPages / 64 + 8))
        #expect(r.backgroundPages == UInt64(r.nonZeroPages), "every non-zero page once, by the stream")
        #expect(cmp.firstDifference == nil)
        #expect(r.digestMatch && r.sourceConfirmedDigest)
    }
}
