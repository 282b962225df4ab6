import ArgumentParser
import FoundationEssentials
import Logging
import OperatorAPI
import VMM
import VirtCore

extension Logger.Level: @retroactive ExpressibleByArgument {}

/// The operator options `run`, `serve` and `snapshot restore` share: the API endpoints, the
/// metrics file and the log level.
struct OperatorOptions: ParsableArguments {
    @Option(name: [.customLong("api-sock"), .customLong("control")],
            help: ArgumentHelp("Serve the HTTP API (docs/api/swiftvisor.yaml) on a Unix socket at this path; 'swiftvisor ctl' and 'curl --unix-socket' talk to it. --control is the old name.", valueName: "path"))
    var apiSock: String?

    @Option(name: .customLong("api-tcp"), help: ArgumentHelp("Also serve the API on loopback TCP (e.g. 127.0.0.1:8080); needs --api-token-file.", valueName: "host:port"))
    var apiTCP: String?

    @Option(name: .customLong("api-token-file"), help: ArgumentHelp("File holding the token TCP clients send as 'Authorization: Bearer TOKEN'.", valueName: "path"))
    var apiTokenFile: String?

    @Option(name: .long, help: ArgumentHelp("Write the metrics (Prometheus text format) to this file when the VM stops.", valueName: "path"))
    var metricsFile: String?

    @Option(name: .long, help: ArgumentHelp("Events logged to standard error: trace, debug, info, notice, warning, error or critical.", valueName: "level"))
    var logLevel: Logger.Level = .info

    var serves: Bool { apiSock != nil || apiTCP != nil }

    func validate() throws {
        if apiTCP != nil && apiTokenFile == nil { throw ValidationError("--api-tcp needs --api-token-file (a file holding the token)") }
        if let t = apiTCP, tcpAddress(t) == nil { throw ValidationError("--api-tcp takes HOST:PORT on loopback, e.g. 127.0.0.1:8080") }
    }

    /// "127.0.0.1:8080" → ("127.0.0.1", 8080).
    func tcpAddress(_ text: String) -> (String, Int)? {
        guard let colon = text.lastIndex(of: ":"), let port = Int(text[text.index(after: colon)...]), (0...65535).contains(port) else { return nil }
        var host = String(text[..<colon])
        if host.hasPrefix("["), host.hasSuffix("]") { host = String(host.dropFirst().dropLast()) }
        return (host, port)
    }

    /// Installs the log handler (cheap: no thread, nothing allocated until an event).
    func bootstrapLogging() -> Logger {
        StderrLogHandler.bootstrap(level: logLevel)
        return Logger(label: "swiftvisor")
    }

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
