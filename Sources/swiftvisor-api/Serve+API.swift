import ArgumentParser
import OperatorAPI
import SwiftvisorCLI
import VMM

extension Serve {
    /// An instance with no VM yet, configured and started through the API.
    func serveAPI() throws {
        let logger = api.bootstrapLogging()
        let controller = VMController(serialOutput: ConsoleOutput.write, kvmPath: kvmPath, logger: logger)
        let servers: [APIServer]
        do {
            servers = try api.startServers(controller, logger: logger)
        } catch {
            printError("swiftvisor: error: \(error)")
            throw ExitCode(ToolStatus.failure)
        }
        logger.notice("waiting for the VM's configuration on the API")
        let result = controller.waitUntilFinished()
        servers.forEach { $0.close() }
        api.writeMetrics(machine: controller.machine, controller: controller)
        guard let result else {
            if controller.machine != nil { throw ExitCode(ToolStatus.failure) }  // it failed to run
            return
        }
        switch result.stopReason {
        case let .exitPort(status): if status != 0 { throw ExitCode(Int32(status)) }
        case .allHalted, .stopped, .migrated: return
        case .timeout: throw ExitCode(ToolStatus.timeout)
        case .shutdown, .engineFailure: throw ExitCode(ToolStatus.failure)
        }
    }
}
