import ArgumentParser
import FoundationEssentials
import Lab
import VMM

struct LabCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "lab",
        abstract: "Experiments that reproduce the source text's scenarios, with measured numbers.",
        discussion: """
            Each lab prints a table that explains its numbers, and writes <name>.json and \
            <name>.svg (a chart) into --output (default: lab-results/).
            """,
        subcommands: [PioVsMmio.self, ParavirtVsEmulated.self, CowSnapshot.self, Dedup.self, BalloonLabCommand.self,
                      UniversalMachine.self, ShadowVsEpt.self, SmepSmapAlias.self, SriovIommu.self, MixedCriticality.self,
                      LiveMigrationLabCommand.self, LabReportCommand.self, ConfidentialVMLabCommand.self])
}

/// Options every lab that runs on one engine takes.
struct LabOptions: ParsableArguments {
    @Option(name: .long, help: ArgumentHelp("Engine: kvm or software (default: kvm when usable).", valueName: "engine"))
    var engine: EngineChoice?

    @OptionGroup var report: LabReportOptions

    func emit<R: Encodable>(_ result: R, name: String, table: LabTable, chart: some LabChart) throws {
        try report.emit(result, name: name, table: table, chart: chart)
    }

    func resolvedEngine() -> EngineChoice {
        if let engine { return engine }
        let e = EngineSelection.makeDefault { printError("swiftvisor: " + $0) }
        return EngineChoice(rawValue: e.name) ?? .software
    }
}

/// Where and how every lab reports its result.
struct LabReportOptions: ParsableArguments {
    @Flag(name: .long, help: "Print the result as JSON instead of the table.")
    var json = false

    @Option(name: .long, help: ArgumentHelp("Directory for the JSON result and the SVG chart.", valueName: "dir"))
    var output = "lab-results"

    /// Writes the JSON result and SVG chart, then prints the table (or, with --json, the JSON).
    func emit<R: Encodable>(_ result: R, name: String, table: LabTable, chart: some LabChart) throws {
        let files = try writeLabOutputs(name: name, directory: output, result: result, chart: chart)
        if json {
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
            print(String(decoding: try encoder.encode(result), as: UTF8.self))
        } else {
            print(table.text, terminator: "")
            print("wrote \(files.json) and \(files.svg)")
        }
    }
}


struct PioVsMmio: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "pio-vs-mmio",
        abstract: "S1: a status device as trapped port I/O vs registers on a shared page scanned by timer.",
        discussion: """
            The 'status-device' guest makes N status reads and M control writes at CPL3, once \
            through port-I/O registers (every access exits to the VMM) and once through a page \
            of ordinary guest memory: the VMM publishes status into it and finds control writes \
            by scanning the page's dirty state at each timer tick (KVM: the dirty log, the vCPU \
            kicked by a host timer; software engine: the second-level page table's dirty flag at \
            each preemption-timer exit).
            """)

    @OptionGroup var options: LabOptions

    @Option(name: .long, help: "Status reads per form.")
    var reads: UInt64 = 1_000_000

    @Option(name: .long, help: "Control writes per form.")
    var writes: UInt64 = 10_000

    @Option(name: .long, help: "KVM: timer period in milliseconds.")
    var tickMs = 1.0

    @Option(name: .long, help: "Software engine: preemption-timer period in guest instructions.")
    var tickInstructions: UInt64 = 100_000

    func validate() throws {
        guard reads > 0, writes > 0, writes <= reads else { throw ValidationError("need 0 < --writes ≤ --reads") }
        guard tickMs > 0, tickInstructions > 0 else { throw ValidationError("timer periods must be positive") }
    }

    func run() throws {
        var lab = PioVsMmioLab(engine: options.resolvedEngine())
        lab.reads = reads
        lab.writes = writes
        lab.tickSeconds = tickMs / 1000
        lab.tickInstructions = tickInstructions
        printError("lab pio-vs-mmio: \(lab.engine.rawValue) engine, \(reads) reads + \(writes) writes per form…")
        let result = try lab.run(progress: .onTerminal("lab pio-vs-mmio", report: options.report))
        try options.emit(result, name: "pio-vs-mmio-\(lab.engine.rawValue)", table: PioVsMmioLab.table(result), chart: PioVsMmioLab.chart(result))
    }
}

struct ParavirtVsEmulated: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "paravirt-vs-emulated",
        abstract: "S2: the same packet workload over an emulated register-interface NIC and over virtio-net.",
        discussion: """
            The 'net-bench' guest sends N frames at CPL3, polling: through the emulated NIC \
            (buffer address, length and a command written to MMIO registers, then a status \
            read — five exits per frame) and through virtio-net (B frames queued, one notify). \
            A calibration run measures one exit's cost on the same engine; the model predicts \
            packets/s from exits per packet alone.
            """)

    @OptionGroup var options: LabOptions

    @Option(name: .long, help: "Frames per device.")
    var packets: UInt64 = 20_000

    @Option(name: .long, help: "Frame size in bytes (22–1514).")
    var size: UInt64 = 256

    @Option(name: .long, help: "virtio-net frames per notify (1–32).")
    var batch: UInt64 = 32

    func validate() throws {
        guard packets > 0 else { throw ValidationError("--packets must be positive") }
        guard (22...1514).contains(size) else { throw ValidationError("--size must be 22–1514") }
        guard (1...32).contains(batch) else { throw ValidationError("--batch must be 1–32") }
    }

    func run() throws {
        var lab = ParavirtVsEmulatedLab(engine: options.resolvedEngine())
        lab.packets = packets
        lab.size = size
        lab.batch = batch
        printError("lab paravirt-vs-emulated: \(lab.engine.rawValue) engine, \(packets) frames per device…")
        let result = try lab.run(progress: .onTerminal("lab paravirt-vs-emulated", report: options.report))
        try options.emit(result, name: "paravirt-vs-emulated-\(lab.engine.rawValue)", table: ParavirtVsEmulatedLab.table(result), chart: ParavirtVsEmulatedLab.chart(result))
    }
}

struct CowSnapshot: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "cow-snapshot",
        abstract: "S6: copy-on-write snapshot latency, faults and write amplification; restore time.",
        discussion: """
            The 'counter' guest runs at CPL3, writing a number of pages per step — 8 bytes each \
            (small writes) or whole pages (large writes). A snapshot is taken while it runs; the \
            table shows how long the guest was paused, how long the snapshot took, the \
            copy-on-write faults and bytes copied against bytes the guest wrote, and the time \
            from restore to the guest's first instruction and first output line, eager and lazy.
            """)

    @OptionGroup var options: LabOptions

    @Option(name: .long, help: ArgumentHelp("Guest RAM.", valueName: "size"))
    var memory = MemoryArgument(argument: "64M")!

    @Option(name: .long, help: "Pages the guest writes per step.")
    var touch: UInt64 = 256

    func run() throws {
        var lab = CowSnapshotLab(engine: options.resolvedEngine())
        lab.memory = memory.bytes
        lab.touch = touch
        printError("lab cow-snapshot: \(lab.engine.rawValue) engine…")
        let result = try lab.run(progress: .onTerminal("lab cow-snapshot", report: options.report))
        try options.emit(result, name: "cow-snapshot-\(lab.engine.rawValue)", table: CowSnapshotLab.table(result), chart: CowSnapshotLab.chart(result))
    }
}

struct Dedup: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "dedup",
        abstract: "S8: memory saved by page deduplication against copy-on-write breaks, by write probability.",
        discussion: """
            The 'dedup-workload' guest keeps N identical pages and writes each with probability p \
            per round. The VMM merges them after a warm-up (once all, once with the policy that \
            merges only pages whose predicted benefit is positive) and counts copy-on-write \
            breaks. The table sets measured net benefit beside the model and the break-even p.
            """)

    @OptionGroup var options: LabOptions

    @Option(name: .long, help: "Identical pages in the guest (≤ 4096).")
    var pages: UInt64 = 1024

    @Option(name: .long, help: "Cost of one copy-on-write break, in page-rounds of saved memory.")
    var breakCost = 16.0

    func validate() throws {
        guard (2...4096).contains(pages) else { throw ValidationError("--pages must be 2–4096") }
        guard breakCost >= 0 else { throw ValidationError("--break-cost must not be negative") }
    }

    func run() throws {
        var lab = DedupLab(engine: options.resolvedEngine())
        lab.pages = pages
        lab.policy.breakCostPageRounds = breakCost
        printError("lab dedup: \(lab.engine.rawValue) engine, \(pages) pages…")
        let result = try lab.run(progress: .onTerminal("lab dedup", report: options.report))
        try options.emit(result, name: "dedup-\(lab.engine.rawValue)", table: DedupLab.table(result), chart: DedupLab.chart(result))
    }
}

struct UniversalMachine: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "universal-machine",
        abstract: "S13: the same guests on KVM, the block translator and the interpreter: identical results, and the speed ratios.",
        discussion: """
            Runs compute (CPL3 integer workloads), coverage (instruction groups with edge cases), \
            user-mode (privilege changes, exceptions) and pio-loop (an exit per access) on the \
            software engine's interpreter, on its block translator and on KVM (when usable). \
            Output, registers and RAM are compared with the interpreter's; wall time and guest \
            instructions per second are reported per engine.
            """)

    @Option(name: .long, help: "Work multiplier for the compute guest (scale=N).")
    var scale = 2

    @Flag(name: .long, help: "Skip KVM even when /dev/kvm is usable.")
    var noKvm = false

    @OptionGroup var report: LabReportOptions

    func validate() throws {
        guard (1...100).contains(scale) else { throw ValidationError("--scale must be 1–100") }
    }

    func run() throws {
        var lab = UniversalMachineLab(scale: scale)
        lab.useKVM = !noKvm
        let result = try lab.run(progress: .onTerminal("lab universal-machine", report: report))
        try report.emit(result, name: "universal-machine", table: UniversalMachineLab.table(result), chart: UniversalMachineLab.chart(result))
    }
}
