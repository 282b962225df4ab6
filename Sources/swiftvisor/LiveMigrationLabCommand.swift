import ArgumentParser
import Dispatch
import FoundationEssentials
#if canImport(Glibc)
import Glibc
#endif
import Lab
import VMM

struct LiveMigrationLabCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "live-migration",
        abstract: "S9: pre-copy vs post-copy live migration against the guest's dirty rate.",
        discussion: """
            The 'migration-integrity' guest writes one byte per page across a \
            16 MiB area, spinning between pages; each dirty rate, from idle to \
            beyond the link, is migrated by pre-copy and by post-copy. As root \
            with iproute2 the migration crosses a veth pair between two network \
            namespaces made for the run (and removed after), shaped by a tbf qdisc \
            to --link-mbit; otherwise loopback TCP, unshaped (--loopback forces \
            it). The table shows rounds, bytes, downtime and total time beside the \
            pre-copy model, and post-copy's remote faults and their latency.
            """)

    @OptionGroup var options: LabOptions

    @Option(name: .long, help: ArgumentHelp("Link rate of the veth pair in Mbit/s.", valueName: "mbit"))
    var linkMbit = 1000

    @Flag(name: .long, help: "Migrate over loopback TCP even where network namespaces can be made.")
    var loopback = false

    @Option(name: .long, help: ArgumentHelp("Pre-copy downtime target in milliseconds.", valueName: "ms"))
    var maxDowntimeMs = 30.0

    @Option(name: .long, help: ArgumentHelp("Guest spin loops between page writes, comma-separated ('idle' for none).", valueName: "list"))
    var spins = "idle,200000,50000,10000,0"

    func run() throws {
        var lab = LiveMigrationLab(engine: options.resolvedEngine())
        lab.maxDowntimeMilliseconds = maxDowntimeMs
        var parsed: [UInt64?] = []
        for word in spins.split(separator: ",") {
            if word == "idle" { parsed.append(nil); continue }
            guard let n = UInt64(word) else { throw ValidationError("--spins: '\(word)' is not a number or 'idle'") }
            parsed.append(n)
        }
        lab.spins = parsed
        if loopback {
            lab.linkMegabits = nil
        } else if let why = VethLink.unavailableReason {
            printError("swiftvisor: \(why); migrating over loopback instead\n")
            lab.linkMegabits = nil
        } else {
            lab.linkMegabits = linkMbit
        }
        printError("lab live-migration: \(lab.engine.rawValue) engine…\n")
        let result = try lab.run(progress: .onTerminal("lab live-migration", report: options.report))
        try options.emit(result, name: "live-migration-\(lab.engine.rawValue)", table: LiveMigrationLab.table(result),
                         chart: LiveMigrationLab.chart(result))
    }
}
