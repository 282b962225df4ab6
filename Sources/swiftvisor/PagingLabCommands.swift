import ArgumentParser
import Dispatch
import FoundationEssentials
#if canImport(Glibc)
import Glibc
#endif
import Lab

struct ShadowVsEpt: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "shadow-vs-ept",
        abstract: "S5: shadow paging vs nested paging (EPT) — exits against page-walk references, on the software engine.",
        discussion: """
            Runs two guests on the software engine, which models both translation schemes:
            'pt-churn' (fork/exec-like page-table churn: address spaces made, switched between \
            with CR3, unmapped with INVLPG and torn down, round after round) and 'working-set' \
            (a 64 MiB working set of 4 KiB pages visited in scattered order: a TLB miss on nearly \
            every access, few table changes). Each runs with shadow paging and with nested \
            paging over 4 KiB, 2 MiB and 1 GiB second-level pages. The table sets the exits \
            shadow mode takes (PTE writes, CR3 loads, INVLPG, shadow fills) against the page \
            walks and their memory references (references per walk: 4 in shadow mode, up to \
            24 nested).
            """)

    @Option(name: .long, help: "Work multiplier (rounds of churn, passes over the working set).")
    var scale = 1

    @OptionGroup var report: LabReportOptions

    func validate() throws {
        guard (1...50).contains(scale) else { throw ValidationError("--scale must be 1–50") }
    }

    func run() throws {
        let lab = ShadowVsEptLab(scale: scale)
        let result = try lab.run(progress: .onTerminal("lab shadow-vs-ept", report: report))
        try report.emit(result, name: "shadow-vs-ept", table: ShadowVsEptLab.table(result), chart: ShadowVsEptLab.chart(result))
    }
}

struct SmepSmapAlias: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "smep-smap-alias",
        abstract: "S10: SMEP/SMAP/WP, a page aliased user-executable and kernel-writable, and MBEC — expected vs observed for every cell.",
        discussion: """
            Runs the 'smep-smap' guest, which builds a supervisor-only kernel mapping and three \
            mappings of one physical page (user read-only+executable, kernel writable+NX, kernel \
            executable) and probes each access under every SMEP/SMAP/RFLAGS.AC setting and \
            CR0.WP: on the software engine with nested and with shadow paging, and on KVM when \
            usable (reported when the host does not expose SMEP or SMAP). Then, on the software \
            engine, mode-based execute control: the VMM denies user or supervisor execution of \
            the page in the second-level table, and logs each violation's qualification. \
            Every observation is held against the architectural rule; ✗ marks a mismatch.
            """)

    @Flag(name: .long, help: "Skip KVM even when /dev/kvm is usable.")
    var noKvm = false

    @OptionGroup var report: LabReportOptions

    func run() throws {
        var lab = SmepSmapAliasLab()
        lab.useKVM = !noKvm
        let result = try lab.run(progress: .onTerminal("lab smep-smap-alias", report: report))
        try report.emit(result, name: "smep-smap-alias", table: SmepSmapAliasLab.table(result), chart: SmepSmapAliasLab.chart(result))
        if result.unexpectedCells > 0 { throw ExitCode(1) }
    }
}
