import FlyingFox
import FlyingSocks
import Foundation
import Logging
import Metrics
import PostcopyCore
import Prometheus
import Synchronization

/// The process's Prometheus endpoint: swift-metrics bootstrapped (once per
/// process) with the swift-prometheus backend, and its registry served in the
/// Prometheus text format at `GET /metrics` by FlyingFox's HTTP server. Every
/// metric the process records through swift-metrics from then on appears there;
/// metric handles made before `start` record nowhere.
public final class MetricsEndpoint: Sendable {
    public let registry: PrometheusCollectorRegistry
    private let server: HTTPServer
    private let task = Mutex<Task<Void, any Error>?>(nil)
    /// The port it listens on (the one asked for, or the one the kernel chose for 0).
    public let port: Int

    /// Fault and recovery times, seconds: from 10 µs (a local fault) to 60 s.
    static let durationBuckets: [Duration] = [
        .microseconds(10), .microseconds(25), .microseconds(50), .microseconds(100), .microseconds(250), .microseconds(500),
        .milliseconds(1), .milliseconds(2.5), .milliseconds(5), .milliseconds(10), .milliseconds(25), .milliseconds(50),
        .milliseconds(100), .milliseconds(250), .milliseconds(500), .seconds(1), .seconds(5), .seconds(15), .seconds(60),
    ]

    private static let bootstrapped = Mutex<PrometheusCollectorRegistry?>(nil)

    /// Bootstraps swift-metrics (the first endpoint of the process does; later
    /// ones share its registry), then listens on `host:port`; returns once the
    /// socket listens, or throws with the reason.
    public static func start(host: String, port: Int, logger: Logger) async throws -> MetricsEndpoint {
        let registry = bootstrapped.withLock { r -> PrometheusCollectorRegistry in
            if let r { return r }
            let reg = PrometheusCollectorRegistry()
            var factory = PrometheusMetricsFactory(registry: reg)
            factory.defaultDurationHistogramBuckets = durationBuckets
            MetricsSystem.bootstrap(factory)
            r = reg
            return reg
        }
        let server = HTTPServer(address: try .inet(ip4: host, port: UInt16(port)), logger: ServerLog(logger: logger))
        await server.appendRoute("GET /metrics") { _ in
            HTTPResponse(statusCode: .ok, headers: [.contentType: "text/plain; version=0.0.4; charset=utf-8"],
                         body: Data(registry.emitToBuffer()))
        }
        let task = Task { try await server.run() }
        do { try await server.waitUntilListening(timeout: 10) } catch {
            task.cancel()
            throw error
        }
        var bound = port
        if case .ip4(_, let p) = await server.listeningAddress { bound = Int(p) }
        return MetricsEndpoint(registry: registry, server: server, task: task, port: bound)
    }

    private init(registry: PrometheusCollectorRegistry, server: HTTPServer, task: Task<Void, any Error>, port: Int) {
        self.registry = registry
        self.server = server
        self.port = port
        self.task.withLock { $0 = task }
    }

    /// From a thread that is not part of Swift concurrency (the CLI's main
    /// thread): `start`, waited for.
    public static func startBlocking(host: String, port: Int, logger: Logger) throws -> MetricsEndpoint {
        let result = Mutex<Result<MetricsEndpoint, any Error>?>(nil)
        let done = DispatchSemaphore(value: 0)
        Task {
            let r: Result<MetricsEndpoint, any Error>
            do { r = .success(try await start(host: host, port: port, logger: logger)) } catch { r = .failure(error) }
            result.withLock { $0 = r }
            done.signal()
        }
        done.wait()
        return try result.withLock { $0! }.get()
    }

    public func stop() {
        task.withLock { $0?.cancel(); $0 = nil }
    }
}

/// The HTTP server's log, into the process's (swift-log): a scrape is a
/// debug line, not stdout, which carries the daemon's JSON events.
struct ServerLog: FlyingSocks.Logging {
    let logger: Logger
    func logDebug(_ debug: @autoclosure () -> String) { logger.trace("\(debug())") }
    func logInfo(_ info: @autoclosure () -> String) { logger.debug("\(info())") }
    func logWarning(_ warning: @autoclosure () -> String) { logger.warning("\(warning())") }
    func logError(_ error: @autoclosure () -> String) { logger.error("\(error())") }
    func logCritical(_ critical: @autoclosure () -> String) { logger.critical("\(critical())") }
}
