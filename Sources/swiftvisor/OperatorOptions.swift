import ArgumentParser
import Logging
import VMM
import VirtCore

extension Logger.Level: @retroactive ExpressibleByArgument {}

/// The operator options `run`, `serve` and `snapshot restore` share: the API endpoints, the
/// metrics file and the log level.
package struct OperatorOptions: ParsableArguments {
    package init() {}

    /// The options' help, shared with `run`'s option table (RunOptions.swift).
    enum Help {
        static let apiSock = "Serve the HTTP API (docs/api/swiftvisor.yaml) on a Unix socket at this path; 'swiftvisor ctl' and 'curl --unix-socket' talk to it. --control is the old name."
        static let apiTCP = "Also serve the API on loopback TCP (e.g. 127.0.0.1:8080); needs --api-token-file."
        static let apiTokenFile = "File holding the token TCP clients send as 'Authorization: Bearer TOKEN'."
        static let metricsFile = "Write the metrics (Prometheus text format) to this file when the VM stops."
        static let logLevel = "Events logged to standard error: trace, debug, info, notice, warning, error or critical."
    }

    @Option(name: [.customLong("api-sock"), .customLong("control")],
            help: ArgumentHelp(Help.apiSock, valueName: "path"))
    package var apiSock: String?

    @Option(name: .customLong("api-tcp"), help: ArgumentHelp(Help.apiTCP, valueName: "host:port"))
    package var apiTCP: String?

    @Option(name: .customLong("api-token-file"), help: ArgumentHelp(Help.apiTokenFile, valueName: "path"))
    package var apiTokenFile: String?

    @Option(name: .long, help: ArgumentHelp(Help.metricsFile, valueName: "path"))
    package var metricsFile: String?

    @Option(name: .long, help: ArgumentHelp(Help.logLevel, valueName: "level"))
    package var logLevel: Logger.Level = .info

    package var serves: Bool { apiSock != nil || apiTCP != nil }

    package func validate() throws {
        if apiTCP != nil && apiTokenFile == nil { throw ValidationError("--api-tcp needs --api-token-file (a file holding the token)") }
        if let t = apiTCP, tcpAddress(t) == nil { throw ValidationError("--api-tcp takes HOST:PORT on loopback, e.g. 127.0.0.1:8080") }
    }

    /// "127.0.0.1:8080" → ("127.0.0.1", 8080).
    package func tcpAddress(_ text: String) -> (String, Int)? {
        guard let colon = text.lastIndex(of: ":"), let port = Int(text[text.index(after: colon)...]), (0...65535).contains(port) else { return nil }
        var host = String(text[..<colon])
        if host.hasPrefix("["), host.hasSuffix("]") { host = String(host.dropFirst().dropLast()) }
        return (host, port)
    }

    /// Installs the log handler (cheap: no thread, nothing allocated until an event).
    package func bootstrapLogging() -> Logger {
        StderrLogHandler.bootstrap(level: logLevel)
        return Logger(label: "swiftvisor")
    }
}
