// swift-tools-version: 6.0
import PackageDescription

let package = Package(
    name: "postcopy",
    platforms: [.macOS(.v15)],
    products: [
        .executable(name: "postcopy", targets: ["postcopy"]),
        .executable(name: "postcopy-bench", targets: ["postcopy-bench"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-log", from: "1.16.2"),
        .package(url: "https://github.com/HdrHistogram/hdrhistogram-swift", from: "0.2.0"),
        .package(url: "https://github.com/apple/swift-crypto", from: "3.12.3"),
        .package(url: "https://github.com/apple/swift-metrics", from: "2.13.0"),
        .package(url: "https://github.com/swift-server/swift-prometheus", from: "2.4.1"),
        .package(url: "https://github.com/swhitty/FlyingFox", from: "0.27.1"),
    ],
    targets: [
        // Kernel interfaces (userfaultfd, epoll/eventfd/poll, threads, clocks, TCP and
        // Unix sockets) and the hot byte loops (zero-page scan, xxh64 digest): one
        // prefixed C shim, one file per section of its umbrella header.
        .target(name: "CPostcopy"),
        // Wire format: frames, codec, handshake. Knows nothing of sockets or threads.
        .target(name: "PostcopyWire"),
        // Core model: errors, fds, threads, memory mappings, page state, digest, stats.
        .target(
            name: "PostcopyCore",
            dependencies: [
                "CPostcopy",
                .product(name: "Histogram", package: "hdrhistogram-swift"),
            ]),
        // Streaming AES-256-GCM for the encrypted TCP stream, from swift-crypto's
        // BoringSSL (its symbols are linked in through Crypto): decrypts
        // straight into place (see Sources/CAEAD/include/caead.h).
        .target(name: "CAEAD", dependencies: [.product(name: "Crypto", package: "swift-crypto")]),
        // Transport protocol and its TCP implementation.
        .target(
            name: "PostcopyTransport",
            dependencies: ["CPostcopy", "CAEAD", "PostcopyWire", "PostcopyCore", .product(name: "Crypto", package: "swift-crypto")]),
        // libibverbs + librdmacm behind a small C shim (connection setup, READ, CQ).
        .target(name: "CRDMA", linkerSettings: [.linkedLibrary("ibverbs"), .linkedLibrary("rdmacm")]),
        // RDMA transport (one-sided READ), the source's RDMA listener, and
        // `TransportFactory` (tcp | rdma | auto, for both sides).
        .target(
            name: "PostcopyRDMA",
            dependencies: [
                "CPostcopy", "CRDMA", "PostcopyWire", "PostcopyCore", "PostcopyTransport",
                .product(name: "Logging", package: "swift-log"),
            ]),
        // Fault injection and other test-only helpers (the chaos proxy), kept out
        // of the modules that ship; used by the tests and `postcopy chaos-proxy`.
        .target(
            name: "PostcopyTesting",
            dependencies: ["CPostcopy", "PostcopyWire", "PostcopyCore", "PostcopyTransport"]),
        // Source page server: talks to listeners and remote-read providers through
        // PostcopyTransport's protocols, never to RDMA.
        .target(
            name: "PostcopySource",
            dependencies: [
                "CPostcopy", "PostcopyWire", "PostcopyCore", "PostcopyTransport",
                .product(name: "Logging", package: "swift-log"),
            ]),
        // Destination: userfaultfd owner, fault thread, scheduler, installer.
        .target(
            name: "PostcopyDestination",
            dependencies: [
                "CPostcopy", "PostcopyWire", "PostcopyCore", "PostcopyTransport",
                .product(name: "Histogram", package: "hdrhistogram-swift"),
                .product(name: "Logging", package: "swift-log"),
            ]),
        // VMM handoff: Firecracker's external page-fault handler protocol.
        // Records its metrics through swift-metrics (whatever backend the
        // process bootstrapped; none: they cost nothing).
        .target(
            name: "PostcopyHandoff",
            dependencies: [
                "CPostcopy", "PostcopyWire", "PostcopyCore", "PostcopyTransport", "PostcopyRDMA", "PostcopyDestination",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Metrics", package: "swift-metrics"),
            ]),
        // The Prometheus endpoint: swift-metrics bootstrapped with the
        // swift-prometheus backend, served at /metrics by FlyingFox's HTTP server.
        .target(
            name: "PostcopyMetrics",
            dependencies: [
                "PostcopyCore", "PostcopySource",
                .product(name: "Metrics", package: "swift-metrics"),
                .product(name: "Prometheus", package: "swift-prometheus"),
                .product(name: "FlyingFox", package: "FlyingFox"),
                .product(name: "FlyingSocks", package: "FlyingFox"),
                .product(name: "Logging", package: "swift-log"),
            ]),
        // Guest side of paravirtual async page faults (what a guest kernel would do), in C.
        .target(name: "CGuestAPF"),
        // Reference guest: workloads on vCPU threads over guest RAM, pause/resume.
        .target(
            name: "PostcopyGuest",
            dependencies: ["CPostcopy", "CGuestAPF", "PostcopyCore"]),
        .executableTarget(
            name: "postcopy",
            dependencies: [
                "CPostcopy", "PostcopyWire", "PostcopyCore", "PostcopyTransport", "PostcopyRDMA",
                "PostcopySource", "PostcopyDestination", "PostcopyHandoff", "PostcopyGuest", "PostcopyTesting", "PostcopyMetrics",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Histogram", package: "hdrhistogram-swift"),
                .product(name: "Logging", package: "swift-log"),
            ]),
        // Benchmark driver: runs `postcopy migrate` and the baselines, tables, JSON, SVG plots.
        .executableTarget(
            name: "postcopy-bench",
            dependencies: [
                "PostcopyCore",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ]),
        .testTarget(name: "PostcopyWireTests", dependencies: ["PostcopyWire"]),
        .testTarget(name: "PostcopyDestinationTests", dependencies: ["PostcopyDestination"]),
        .testTarget(name: "PostcopyGuestTests", dependencies: ["CPostcopy", "PostcopyGuest", "PostcopyCore"]),
        .testTarget(
            name: "PostcopyCoreTests",
            dependencies: ["PostcopyCore", .product(name: "Histogram", package: "hdrhistogram-swift")]),
        .testTarget(
            name: "PostcopyIntegrationTests",
            dependencies: [
                "CPostcopy", "PostcopyWire", "PostcopyCore", "PostcopyTransport", "PostcopyRDMA",
                "PostcopySource", "PostcopyDestination", "PostcopyHandoff", "PostcopyGuest", "PostcopyTesting",
                .product(name: "Logging", package: "swift-log"),
            ]),
    ],
    swiftLanguageModes: [.v6]
)
