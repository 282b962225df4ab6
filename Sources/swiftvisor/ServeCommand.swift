import ArgumentParser
import OperatorAPI
import VMM

struct Serve: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Start an instance with no VM yet: configure and start one through the HTTP API.",
        discussion: """
            The instance waits on its API socket; a client configures the VM (PUT /machine-config, \
            /boot-source, /drives/ID, /network-interfaces/ID, /balloon, or PUT /snapshot/load) and \
            starts it (PUT /actions {"action_type":"InstanceStart"}). The guest's console goes to \
            standard output. The process ends when the VM stops, with the guest's exit status \
            (0 after a Stop through the API). The API: docs/api/swiftvisor.yaml.

            Example:
              swiftvisor serve --api-sock /tmp/vm.sock &
              curl --unix-socket /tmp/vm.sock -X PUT http://localhost/boot-source -d '{"guest":"counter"}'
              curl --unix-socket /tmp/vm.sock -X PUT http://localhost/actions -d '{"action_type":"InstanceStart"}'
              swiftvisor ctl --api-sock /tmp/vm.sock status
            """)

    @OptionGroup(title: "Operator API, metrics and logs")
    var api: OperatorOptions

    @Option(name: .long, help: .hidden)
    var kvmPath = "/dev/kvm"

    func validate() throws {
        guard api.serves else { throw ValidationError("serve needs --api-sock PATH (or --api-tcp)") }
    }

    func run() throws {
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
