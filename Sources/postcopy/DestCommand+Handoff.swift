import ArgumentParser
import Foundation
import Logging
import PostcopyCore
import PostcopyDestination
import PostcopyHandoff
import PostcopyMetrics
import PostcopyTransport

extension DestCommand {
    /// The page-fault daemon for VMMs (Firecracker's external handler protocol).
    func runHandoff(_ path: String, logger: Logger) throws {
        let kind = common.transport
        let endpoint = connect
        let json = common.json
        // `--transport rdma` without a device fails now, not when a VMM arrives.
        let key = try common.loadKey()
        let encryption = try common.streamEncryption()
        let (_, reason) = try Transports.connect(kind, to: endpoint, maxBatchPages: batchPages, authKey: key, encryption: encryption)
        logger.info("transport for VMMs: \(reason)")
        var config = engineConfig()
        if let file = replayWorkingSet {
            // Checked now: a file that cannot be read, or is corrupt, is the
            // operator's to fix before any VMM comes.
            do { config.replayWorkingSet = try WorkingSet.load(from: file) } catch { throw fail("--replay-working-set: \(error)") }
        }
        // Before the server: its metric handles bind to the backend bootstrapped here.
        var metrics: MetricsEndpoint?
        if let m = metricsListen {
            do { metrics = try MetricsEndpoint.startBlocking(host: m.host, port: m.port, logger: logger) } catch {
                throw fail("--metrics-listen \(m): \(error)")
            }
            logger.info("metrics at http://\(m.host):\(metrics!.port)/metrics")
        }
        defer { metrics?.stop() }
        let server: HandoffServer
        do {
            server = try HandoffServer(
                path: path, source: endpoint, engineConfig: config, authKey: key, encryption: encryption, logger: logger,
                transport: kind, workingSetOut: recordWorkingSet,
                onComplete: { pid, at in
                    if json {
                        emitEvent(.complete(.init(vmmPid: Int(pid), completedAtNs: at)))
                    } else {
                        print("VMM pid \(pid): every page is in")
                    }
                },
                onSessionEnd: { report in
                    if json {
                        emitEvent(.session(report))
                    } else {
                        let l = report.faultLatency
                        print("VMM pid \(report.vmmPid) gone (install path \(report.installPath)): \(report.completed ? "complete" : "INCOMPLETE") \(report.error ?? ""); faults \(report.faults), demand \(report.demandPages), background \(report.backgroundPages); fault service p50 \(formatDuration(ns: l.p50Ns)) p99 \(formatDuration(ns: l.p99Ns)) max \(formatDuration(ns: l.maxNs))")
                    }
                },
                onPrepared: { pid, path, prealloc in
                    if json {
                        emitEvent(.prepared(.init(vmmPid: Int(pid), installPath: path, preallocationSeconds: prealloc)))
                    } else {
                        print("VMM pid \(pid): install path \(path)\(path == "copy" ? "" : ", guest RAM preallocated in \(fixed(prealloc, 3)) s")")
                    }
                },
                onRejected: { pid, reason in
                    if json { emitEvent(.refused(.init(vmmPid: Int(pid), reason: reason))) }
                })
        } catch {
            throw fail("\(error)")
        }
        server.start()
        if json {
            emitEvent(.listening(.init(handoff: path, metricsPort: metrics?.port)))
        } else {
            print("waiting for VMMs on \(path)\(metrics.map { ", metrics on port \($0.port)" } ?? "")")
        }
        server.wait(sessions: once ? 1 : 0)
        server.stop()
        if once, server.stats.completed.load(ordering: .relaxed) == 0 { throw ExitCode(1) }
    }
}
