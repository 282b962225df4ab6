import ArgumentParser
import Lab
import VMM

struct ConfidentialVMLabCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "confidential-vm",
        abstract: "S11: encrypted guest memory — the host's view, permissions, attacks with and without the reverse map, cost.",
        discussion: """
            Runs on the software engine (the host has no SEV). The 'confidential' guest fills private \
            pages with a known pattern; the lab shows what the host sees (byte entropy, the pattern \
            found or not), that second-level faults still reach the VMM, what the four host attacks \
            (remap, replay, alias, DMA) do without the reverse map (SEV) and with it (SEV-SNP), and \
            the cost: compute's MIPS and the working-set guest's time per page walk, unencrypted and \
            encrypted. See docs/confidential-vm.md.
            """)

    @OptionGroup var report: LabReportOptions

    @Option(name: .long, help: ArgumentHelp("Only this attack (remap, replay, alias, dma); repeatable. Default: all.", valueName: "attack"))
    var attack: [ConfidentialAttack] = []

    @Option(name: .long, help: "compute's scale for the cost rows.")
    var scale = 1

    func validate() throws {
        guard (1...64).contains(scale) else { throw ValidationError("--scale must be 1–64") }
    }

    func run() throws {
        var lab = ConfidentialVMLab()
        lab.computeScale = scale
        if !attack.isEmpty { lab.attacks = attack }
        let result = try lab.run(progress: .onTerminal("lab confidential-vm", report: report))
        try report.emit(result, name: "confidential-vm", table: ConfidentialVMLab.table(result), chart: ConfidentialVMLab.chart(result))
    }
}

extension ConfidentialAttack: ExpressibleByArgument {}
