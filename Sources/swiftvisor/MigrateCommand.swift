import ArgumentParser
import VMM

package struct MigrateCommand: ParsableCommand {
    package init() {}

    package static let configuration = CommandConfiguration(
        commandName: "migrate",
        abstract: "Live-migrate a running VM to a destination started with 'run --incoming'.",
        discussion: """
            The VM is reached through its API socket (run … --api-sock PATH; PUT /migrate). \
            Pre-copy (the default): RAM is sent while the guest runs, then the \
            pages it dirtied, round after round, until the rest fits \
            --max-downtime-ms at the measured bandwidth (or --max-rounds is \
            reached); then the guest pauses and the rest goes with the vCPU and \
            device state. --postcopy: the state goes first, the guest runs at the \
            destination at once and pulls its pages. The engines may differ (kvm → \
            software and back). If anything fails before the destination \
            confirms, the VM resumes here. If a post-copy stream breaks after the \
            switch-over, the guest waits at the destination for the pages only \
            this side holds, and this process keeps them: --resume reconnects \
            (to the destination's --incoming address) and finishes.

            Example (two terminals):
              swiftvisor run --incoming tcp:127.0.0.1:7000 --engine software
              swiftvisor run counter --api-sock /tmp/vm.sock
              swiftvisor migrate --socket /tmp/vm.sock tcp:127.0.0.1:7000
            """
    )

    @Option(name: .long, help: ArgumentHelp("The VM's API socket (run --api-sock PATH).", valueName: "path"))
    package var socket: String

    @Argument(help: ArgumentHelp("Destination: tcp:HOST:PORT or unix:PATH.", valueName: "destination"))
    package var destination: String

    @Option(name: .long, help: ArgumentHelp("Largest acceptable pause of the guest, in milliseconds (default 300).", valueName: "ms"))
    package var maxDowntimeMs: Double?

    @Option(name: .long, help: ArgumentHelp("Dirty rounds before the guest is stopped regardless (default 30).", valueName: "n"))
    package var maxRounds: Int?

    @Flag(name: .long, help: "Post-copy: move the vCPU and device state first and run the guest at the destination at once; its pages follow on demand (each first touch asks the source) and in the background.")
    package var postcopy = false

    @Flag(name: .long, help: "Pre-copy: when rounds do not converge, hold the guest paused for a growing share of each round (50 % … 99 %), as QEMU's auto-converge throttles vCPUs.")
    package var autoConverge = false

    @Flag(name: .long, help: "Reconnect a post-copy migration that broke after the switch-over and finish it (QEMU's post-copy recovery).")
    package var resume = false

    @Flag(name: .long, help: "Print the final report as JSON on standard output.")
    package var json = false

    package func validate() throws {
        do { _ = try MigrationAddress(parsing: destination) } catch { throw ValidationError("\(error)") }
        if let m = maxDowntimeMs, !(m >= 0) { throw ValidationError("--max-downtime-ms must be ≥ 0") }
        if let r = maxRounds, r < 0 { throw ValidationError("--max-rounds must be ≥ 0") }
    }

    package func run() throws { try OperatorCommands.run(self) }
}
