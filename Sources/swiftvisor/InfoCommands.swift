import ArgumentParser
import GuestImages
import FoundationEssentials
import VMM

struct Guests: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "guests",
        abstract: "List the bundled guests (name, then what it does).")

    @Flag(name: .long, help: "Also list guests that exist to exercise failure paths in tests.")
    var all = false

    func run() {
        let guests = BundledGuests.all.filter { all || !$0.isTestGuest }
        let width = guests.map(\.name.count).max() ?? 0
        for g in guests {
            print(g.name.padded(to: width + 2) + g.summary + (g.isTestGuest ? " [test]" : ""))
        }
    }
}

struct Host: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "host",
        abstract: "Report this host's KVM (device, API version, capabilities, vCPU limits) and how the software engine runs here.")

    @Option(name: .long, help: ArgumentHelp("KVM device to examine.", valueName: "path"))
    var kvmPath = "/dev/kvm"

    func run() throws {
        print("software engine:  " + (EngineSelection.softwareEngineTranslates
            ? "block translator to host code (BMI2 present), interpreter for the rest"
            : "interpreter only (this CPU lacks BMI2, which translated code needs)"))
        if let caps = try? EngineSelection.capabilities(of: .software) {
            print("software caps:    " + caps.map(\.rawValue).joined(separator: ", "))
        }
        let r: HostKVMReport
        do {
            r = try EngineSelection.kvmHostReport(kvmPath: kvmPath)
        } catch {
            print("kvm: unavailable — \(error)")
            throw ExitCode(1)
        }
        if let caps = try? EngineSelection.capabilities(of: .kvm, kvmPath: kvmPath) {
            print("kvm caps:         " + caps.map(\.rawValue).joined(separator: ", "))
        }
        print("kvm device:       \(r.path)")
        print("api version:      \(r.apiVersion)")
        print("vCPUs:            \(r.recommendedVCPUs) recommended, \(r.maxVCPUs) maximum (swiftvisor: \(BootLayout.maxVCPUs))")
        print("capabilities:")
        let width = r.capabilities.map(\.name.count).max() ?? 0
        for cap in r.capabilities {
            let value = cap.value
            let state = value > 0 ? (value == 1 ? "yes" : "yes (\(value))") : "no"
            print("  " + cap.name.padded(to: width + 2) + state + (cap.required ? "  [required]" : ""))
        }
    }
}

struct Bench: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "bench",
        abstract: "Benchmarks (printed table; --json for machine-readable results).",
        subcommands: [BenchExits.self, BenchCPU.self, BenchStartup.self, BenchMigration.self, BenchLinuxBoot.self, BenchLinuxRestore.self])
}

struct BenchExits: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "exits",
        abstract: "Cost of a port-I/O exit: Swift run loop vs a plain C KVM_RUN loop, same guest, same run.",
        discussion: """
            Runs the bundled 'pio-loop' guest, which writes port 0x80 N times, at the chosen \
            ring(s), through swiftvisor's run loop and through the C loop in the CKVM shim. \
            Per-exit cost = (time with N writes − time with 0 writes) / N; the paths are \
            interleaved R times and the fastest run of each counts. \
            On nested KVM, ring 0 guest code is emulated by the host, so the two rings differ.
            """)

    @Option(name: .long, help: "Port writes per run.")
    var count: UInt64 = 50_000

    @Option(name: .long, help: "Rounds per ring (each runs both loops; the fastest counts).")
    var repetitions = 5

    @Option(name: .long, help: "Guest ring: 0, 3 or both.")
    var ring = "both"

    @Option(name: .long, help: ArgumentHelp("Also write results as JSON to this file.", valueName: "path"))
    var json: String?

    @Option(name: .long, help: .hidden)
    var kvmPath = "/dev/kvm"

    func validate() throws {
        guard ["0", "3", "both"].contains(ring) else { throw ValidationError("--ring must be 0, 3 or both") }
        guard count > 0 else { throw ValidationError("--count must be positive") }
        guard repetitions > 0 else { throw ValidationError("--repetitions must be positive") }
    }

    func run() throws {
        let rings = ring == "both" ? [0, 3] : [Int(ring)!]
        let bench = ExitCostBenchmark(count: count, repetitions: repetitions, rings: rings, kvmPath: kvmPath)
        let rows: [ExitCostBenchmark.Row]
        do {
            rows = try bench.run { printError("bench: \($0)") }
        } catch {
            printError("swiftvisor: error: \(error)")
            throw ExitCode(ToolStatus.failure)
        }
        print("port-I/O exit round trip on KVM (\(count) exits, best of \(repetitions))")
        print("ring   Swift run loop   C KVM_RUN loop   ratio (Swift/C)")
        for r in rows {
            print("CPL\(r.ring)   " + fmt(r.swiftNanosecondsPerExit).padded(to: 17)
                  + fmt(r.cNanosecondsPerExit).padded(to: 17)
                  + "\(r.ratio.fixed(3))×")
        }
        if let path = json {
            struct Output: Encodable { var benchmark = "exits"; var engine = "kvm"; var results: [ExitCostBenchmark.Row] }
            try writeJSON(path, Output(results: rows))
        }
    }

    private func fmt(_ ns: Double) -> String { "\((ns / 1000).fixed(2)) µs" }
}

struct BenchCPU: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "cpu",
        abstract: "Guest instructions per second of the software engine on the 'compute' workloads, beside KVM.",
        discussion: """
            Runs the bundled 'compute' guest (sieve, CRC-32, heapsort, SHA-256-style mixing, \
            at CPL3) on the software engine, counting retired guest instructions: with its \
            block translator (the default) with nested paging, and again with shadow paging \
            (unless --no-shadow), as a confidential VM with encrypted memory (unless --no-confidential; \
            docs/confidential-vm.md), and interpreting every instruction (unless --no-interpreted); and on KVM when /dev/kvm is usable, where the same workloads run \
            natively. Benchmarks/qemu-compare.sh sets the translated figure beside QEMU TCG.
            """)

    @Flag(name: .long, help: "Skip the interpreted run (it takes about 15× longer than the translated one).")
    var noInterpreted = false

    @Flag(name: .long, help: "Skip the translated run with shadow paging (the 'software-shadow' row).")
    var noShadow = false

    @Flag(name: .long, help: "Skip the translated run as a confidential VM (the 'software-confidential' row).")
    var noConfidential = false

    @Option(name: .long, help: "Work multiplier passed to the guest (scale=N).")
    var scale = 1

    @Option(name: .long, help: ArgumentHelp("Also write results as JSON to this file.", valueName: "path"))
    var json: String?

    @Option(name: .long, help: .hidden)
    var kvmPath = "/dev/kvm"

    func validate() throws {
        guard scale >= 1 else { throw ValidationError("--scale must be at least 1") }
    }

    func run() throws {
        let rows: [CPUBenchmark.Row]
        do {
            var bench = CPUBenchmark(scale: scale, kvmPath: kvmPath, interpreted: !noInterpreted)
            bench.shadowPaging = !noShadow
            bench.confidential = !noConfidential
            rows = try bench.run { printError("bench: \($0)") }
        } catch {
            printError("swiftvisor: error: \(error)")
            throw ExitCode(ToolStatus.failure)
        }
        print("compute workloads, scale \(scale) (guest at CPL3)")
        print("engine                 wall time    guest instructions   MIPS      translated")
        for r in rows {
            print(r.engine.padded(to: 23)
                  + "\(r.seconds.fixed(3)) s".padded(to: 13)
                  + (r.instructions.map { String($0) } ?? "(native)").padded(to: 21)
                  + (r.mips.map { $0.fixed(1) } ?? "-").padded(to: 10)
                  + (r.translatedShare.map { "\(($0 * 100).fixed(2)) %" } ?? "-"))
        }
        if let kvm = rows.first(where: { $0.engine == "kvm" }) {
            print("software (translated) / kvm wall time: \((rows[0].seconds / kvm.seconds).fixed(1))×")
        }
        if let confidential = rows.first(where: { $0.engine == "software-confidential" }) {
            print("confidential (encrypted memory) / unencrypted wall time: \((confidential.seconds / rows[0].seconds).fixed(2))×")
        }
        if let interpreted = rows.first(where: { $0.engine == "software-interpreted" }) {
            print("translation speed-up over the interpreter: \((interpreted.seconds / rows[0].seconds).fixed(1))×")
        }
        if let path = json {
            struct Output: Encodable { var benchmark = "cpu"; var scale: Int; var results: [CPUBenchmark.Row] }
            try writeJSON(path, Output(scale: scale, results: rows))
        }
    }
}
