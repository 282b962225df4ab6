import ArgumentParser

package struct Serve: ParsableCommand {
    package init() {}

    package static let configuration = CommandConfiguration(
        commandName: "serve",
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
    package var api: OperatorOptions

    @Option(name: .long, help: .hidden)
    package var kvmPath = "/dev/kvm"

    package func validate() throws {
        guard api.serves else { throw ValidationError("serve needs --api-sock PATH (or --api-tcp)") }
    }

    package func run() throws { try OperatorCommands.run(self) }
}
