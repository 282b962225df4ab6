import ArgumentParser
import FoundationEssentials
import OperatorAPI
import VMM

struct BalloonCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "balloon",
        abstract: "Inflate or deflate a running VM's balloon (run it with --balloon --api-sock PATH).",
        discussion: """
            Sets the balloon's target in MiB (or 4 KiB pages with --pages); without a size, reports it. \
            The guest's balloon driver hands pages over; the VMM discards them, so the host gets the \
            memory back (host_bytes is the VM's RAM as the host holds it now).
            """)

    @Option(name: .long, help: ArgumentHelp("The VM's API socket (run … --api-sock PATH).", valueName: "path"))
    var socket: String

    @Argument(help: "Target balloon size in MiB.")
    var mib: UInt32?

    @Option(name: .long, help: "Target balloon size in 4 KiB pages instead.")
    var pages: UInt32?

    func validate() throws {
        if mib != nil && pages != nil { throw ValidationError("give the size in MiB or --pages, not both") }
        if let mib, mib > UInt32.max / 256 { throw ValidationError("balloon size too large") }
    }

    func run() throws {
        let target = pages ?? mib.map { $0 * 256 }
        let b = try CtlRequests.balloon(socket: socket, targetPages: target)
        print("balloon: target \(b.targetPages) pages (\(b.targetPages / 256) MiB), guest has given \(b.actualPages) pages; host holds "
              + "\((Double(b.hostBytes) / 1048576).fixed(1)) MiB of the VM's RAM")
    }
}
