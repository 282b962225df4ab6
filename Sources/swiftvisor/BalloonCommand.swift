import ArgumentParser
import VMM

package struct BalloonCommand: ParsableCommand {
    package init() {}

    package static let configuration = CommandConfiguration(
        commandName: "balloon",
        abstract: "Inflate or deflate a running VM's balloon (run it with --balloon --api-sock PATH).",
        discussion: """
            Sets the balloon's target in MiB (or 4 KiB pages with --pages); without a size, reports it. \
            The guest's balloon driver hands pages over; the VMM discards them, so the host gets the \
            memory back (host_bytes is the VM's RAM as the host holds it now).
            """)

    @Option(name: .long, help: ArgumentHelp("The VM's API socket (run … --api-sock PATH).", valueName: "path"))
    package var socket: String

    @Argument(help: "Target balloon size in MiB.")
    package var mib: UInt32?

    @Option(name: .long, help: "Target balloon size in 4 KiB pages instead.")
    package var pages: UInt32?

    package func validate() throws {
        if mib != nil && pages != nil { throw ValidationError("give the size in MiB or --pages, not both") }
        if let mib, mib > UInt32.max / 256 { throw ValidationError("balloon size too large") }
    }

    package func run() throws { try OperatorCommands.run(self) }
}
