import ArgumentParser
import CPostcopy
import Foundation
import PostcopyCore
import PostcopyTesting
import PostcopyTransport

/// A TCP proxy that cuts every connection through it, again and again: for
/// testing recovery from broken connections on one machine.
struct ChaosProxyCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "chaos-proxy",
        abstract: "Forward TCP to a source and cut every connection through it --cuts times, every --interval-ms (recovery testing).")

    @Option(name: .long, help: "Listen address, HOST:PORT (port 0: any; printed first).") var listen: String = "127.0.0.1:0"
    @Option(name: .long, help: "The source, HOST:PORT.") var to: String
    @Option(name: .long, help: "How many times to cut.") var cuts: Int = 20
    @Option(name: .long, help: "Milliseconds between cuts, counted from the first connection.") var intervalMs: Int = 50

    func validate() throws {
        guard Endpoint(parsing: listen) != nil, Endpoint(parsing: to) != nil else { throw ValidationError("--listen and --to must be HOST:PORT") }
        guard cuts >= 0, intervalMs > 0 else { throw ValidationError("--cuts must be >= 0 and --interval-ms > 0") }
    }

    func run() throws {
        let proxy: ChaosProxy
        do { proxy = try ChaosProxy(target: Endpoint(parsing: to)!, listen: Endpoint(parsing: listen)!) } catch { throw fail("\(error)") }
        FileHandle.standardOutput.write(Data("listening on port \(proxy.port)\n".utf8))
        while !proxy.hasSeenConnections { usleep(1000) }
        for i in stride(from: 1, through: cuts, by: 1) {
            usleep(useconds_t(intervalMs * 1000))
            let n = proxy.cut()
            FileHandle.standardError.write(Data("cut \(i): \(n) connection(s)\n".utf8))
        }
        // Keep forwarding until killed.
        while true { sleep(3600) }
    }
}
