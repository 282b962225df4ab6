import ArgumentParser
import VMM
#if canImport(Glibc)
import Glibc
#endif

package struct Ctl: ParsableCommand {
    package init() {}

    package static let configuration = CommandConfiguration(
        commandName: "ctl",
        abstract: "Drive a VM through its HTTP API socket (run/serve … --api-sock PATH).",
        discussion: """
            Actions:
              status                       state, engine, vCPUs, memory, uptime (GET /)
              start                        start a 'serve' instance's configured VM (InstanceStart)
              pause | resume               pause or resume the vCPUs (PATCH /vm)
              stop                         stop the VM (Stop)
              snapshot FILE [--note TEXT]  copy-on-write snapshot while it runs (PUT /snapshot/create)
              balloon [MIB] [--pages N]    report or set the balloon's target (GET|PATCH /balloon)
              metrics                      the Prometheus metrics (GET /metrics)
              migrate ADDRESS [options]    live migration, as 'swiftvisor migrate' (PUT /migrate)
            The API itself is described in docs/api/swiftvisor.yaml; curl works too:
              curl --unix-socket /tmp/vm.sock http://localhost/
            """)

    @Option(name: .customLong("api-sock"), help: ArgumentHelp("The VM's API socket.", valueName: "path"))
    package var apiSock: String

    @Argument(help: ArgumentHelp("status, start, pause, resume, stop, snapshot, balloon, metrics or migrate.", valueName: "action"))
    package var action: String

    @Argument(parsing: .captureForPassthrough, help: ArgumentHelp("The action's arguments.", valueName: "arguments"))
    package var arguments: [String] = []

    package func run() throws { try OperatorCommands.run(self) }
}
