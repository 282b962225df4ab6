import ArgumentParser
import FoundationEssentials
import Logging
import OperatorAPI
import SwiftvisorCLI
import VMM
import VirtCore

extension OperatorOptions {
    /// Starts the API servers asked for, serving `controller`.
    func startServers(_ controller: VMController, logger: Logger) throws -> [APIServer] {
        let router = APIRouter(controller: controller)
        var servers: [APIServer] = []
        do {
            if let apiSock { servers.append(try APIServer(endpoint: .unix(path: apiSock), router: router, logger: logger)) }
            if let apiTCP, let (host, port) = tcpAddress(apiTCP), let tokenFile = apiTokenFile {
                guard let data = try? Data(contentsOf: URL(fileURLWithPath: tokenFile)),
                      case let token = String(decoding: data, as: UTF8.self).trimmed, !token.isEmpty else {
                    throw ValidationError("cannot read a token from \(tokenFile)")
                }
                servers.append(try APIServer(endpoint: .tcp(host: host, port: port, token: token), router: router, logger: logger))
            }
        } catch {
            servers.forEach { $0.close() }
            throw error
        }
        return servers
    }

    /// Writes the metrics file, if asked for.
    func writeMetrics(machine: Machine?, controller: VMController?) {
        guard let metricsFile else { return }
        do { try writeFile(metricsFile, MetricsExporter.text(machine: machine, controller: controller)) } catch { printError("swiftvisor: error: cannot write \(metricsFile): \(error)") }
    }
}

/// An API served for a machine that `run` (or `snapshot restore`) runs itself.
struct OperatorSession {
    let controller: VMController?
    let servers: [APIServer]
    let options: OperatorOptions
    let machine: Machine

    /// Starts what `options` ask for; one clear line and exit 125 when it cannot.
    init(_ options: OperatorOptions, machine: Machine) throws {
        self.options = options
        self.machine = machine
        guard options.serves else {
            controller = nil
            servers = []
            return
        }
        let logger = options.bootstrapLogging()
        let controller = VMController(running: machine, logger: logger)
        self.controller = controller
        do {
            servers = try options.startServers(controller, logger: logger)
        } catch {
            printError("swiftvisor: error: \(error)")
            throw ExitCode(ToolStatus.failure)
        }
    }

    /// Closes the servers (removing their sockets) and writes the metrics file.
    func finish() {
        servers.forEach { $0.close() }
        options.writeMetrics(machine: machine, controller: controller)
    }
}
