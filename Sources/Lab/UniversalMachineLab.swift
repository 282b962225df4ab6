import Dispatch
import FoundationEssentials
#if canImport(Glibc)
import Glibc
#endif
import GuestImages
import VirtCore
import VMM

/// Scenario S13: an emulator is a universal machine — the same guest binary computes the
/// same thing on hardware virtualization (KVM), on the software engine's block translator
/// and on its interpreter — and hardware support (or, failing it, translation) is what
/// makes emulation fast. Each guest runs on every engine; the table says whether output,
/// registers and RAM agree with the interpreter (the reference) and how fast each ran.
package struct UniversalMachineLab: Sendable {
    package struct Workload: Sendable {
        package var guest: String
        package var commandLine: String
        package var ring: String
        package init(guest: String, commandLine: String, ring: String) {
            self.guest = guest; self.commandLine = commandLine; self.ring = ring
        }
    }

    package var workloads: [Workload]
    /// Also run on KVM (when /dev/kvm is usable).
    package var useKVM = true
    package var memory: UInt64 = 32 << 20

    package init(scale: Int = 2) {
        workloads = [
            Workload(guest: "compute", commandLine: "scale=\(scale)", ring: "CPL3"),
            Workload(guest: "coverage", commandLine: "", ring: "CPL0+CPL3"),
            Workload(guest: "user-mode", commandLine: "", ring: "CPL0+CPL3"),
            Workload(guest: "pio-loop", commandLine: "count=20000 ring=3", ring: "CPL3, an exit per access"),
        ]
    }

    package struct Row: Codable, Sendable {
        package var guest: String
        package var ring: String
        package var engine: String
        package var seconds: Double
        /// Guest instructions retired (software engine only).
        package var instructions: UInt64?
        package var mips: Double?
        /// Compared with the interpreter's run of the same guest.
        package var sameOutput: Bool
        package var sameRegisters: Bool
        /// 8-byte words of RAM that differ, and how many of those differ only in RFLAGS.IOPL
        /// (this nested KVM pushes IOPL=0 for CPL3 code; docs/guest-abi.md).
        package var ramWordsDiffering: Int
        package var ramWordsDifferingOnlyInIOPL: Int
    }

    package struct Result: Codable, Sendable {
        package var rows: [Row]
        /// compute: interpreter time / translator time, translator time / KVM time.
        package var translationSpeedup: Double?
        package var kvmSpeedupOverTranslation: Double?
    }

    struct Observation {
        var output: String
        var registers: [UInt64]
        var ram: [UInt8]
        var seconds: Double
        var instructions: UInt64?
    }

    func observe(_ w: Workload, on engine: any Engine) throws -> Observation {
        let out = GuestOutput()
        var config = MachineConfiguration(memorySize: memory, commandLine: w.commandLine, timeoutSeconds: 600)
        config.recordExits = false
        let m = try Machine(image: try GuestProgram.load(w.guest), configuration: config, engine: engine, serialOutput: out.append)
        let r = try m.run()
        if case .engineFailure = r.stopReason { throw LabError.guestFailed(what: w.guest, reason: r.stopReason.summary, output: out.text) }
        let s = try m.vcpuState(0)
        // The boot info names the engine's hypercall mechanism: the one intended difference.
        try m.memory.store(UInt32(0), at: BootLayout.bootInfoAddress + 20)
        try m.memory.store(UInt16(0), at: BootLayout.bootInfoAddress + 24)
        return Observation(output: out.text, registers: s.gprs + [s.rip], ram: try m.memory.read(at: 0, count: Int(m.memory.size)),
                           seconds: Double(r.wallNanoseconds) / 1e9, instructions: m.executionCounts?.instructions)
    }

    /// One step per guest and engine reported to `progress`.
    package func run(progress: LabProgress = .silent) throws -> Result {
        var engines: [(String, any Engine)] = [("software (interpreted)", try EngineSelection.make(.software, translation: false))]
        if EngineSelection.softwareEngineTranslates {
            engines.append(("software (translated)", try EngineSelection.make(.software, translation: true)))
        }
        if useKVM, let kvm = try? EngineSelection.make(.kvm) { engines.append(("kvm", kvm)) }
        var rows: [Row] = []
        progress.begin(steps: workloads.count * engines.count)
        for w in workloads {
            var reference: Observation?
            for (name, engine) in engines {
                progress.step("\(w.guest) \(w.commandLine) on \(name)")
                let o = try observe(w, on: engine)
                let ref = reference ?? o
                if reference == nil { reference = o }
                let (words, iopl) = Self.differingWords(ref.ram, o.ram)
                rows.append(Row(guest: w.guest + (w.commandLine.isEmpty ? "" : " " + w.commandLine), ring: w.ring, engine: name,
                                seconds: o.seconds, instructions: o.instructions,
                                mips: o.instructions.map { Double($0) / o.seconds / 1e6 },
                                sameOutput: o.output == ref.output, sameRegisters: o.registers == ref.registers,
                                ramWordsDiffering: words, ramWordsDifferingOnlyInIOPL: iopl))
            }
        }
        progress.finish()
        func seconds(_ engine: String) -> Double? { rows.first { $0.guest.hasPrefix("compute") && $0.engine == engine }?.seconds }
        let interpreted = seconds("software (interpreted)"), translated = seconds("software (translated)"), kvm = seconds("kvm")
        return Result(rows: rows,
                      translationSpeedup: interpreted.flatMap { i in translated.map { i / $0 } },
                      kvmSpeedupOverTranslation: translated.flatMap { t in kvm.map { t / $0 } })
    }

    /// Differing 8-byte words, and how many of them differ only in bits 12–13 (IOPL).
    static func differingWords(_ a: [UInt8], _ b: [UInt8]) -> (Int, Int) {
        a.withUnsafeBytes { pa in
            b.withUnsafeBytes { pb in
                let wa = pa.bindMemory(to: UInt64.self), wb = pb.bindMemory(to: UInt64.self)
                var all = 0, iopl = 0
                for i in 0..<min(wa.count, wb.count) where wa[i] != wb[i] {
                    all += 1
                    if wa[i] ^ wb[i] == 0x3000 { iopl += 1 }
                }
                return (all, iopl)
            }
        }
    }

    package static func table(_ r: Result) -> LabTable {
        let rows = r.rows.map { x in
            [x.guest, x.ring, x.engine, (x.seconds * 1000).fixed(1),
             x.instructions.map(String.init) ?? "(native)", x.mips.map { $0.fixed(0) } ?? "-",
             x.sameOutput ? "same" : "DIFFERS", x.sameRegisters ? "same" : "DIFFERS",
             x.ramWordsDiffering == 0 ? "same"
                : x.ramWordsDiffering == x.ramWordsDifferingOnlyInIOPL ? "IOPL only (\(x.ramWordsDiffering) words)"
                : "\(x.ramWordsDiffering) words DIFFER"]
        }
        var notes = [
            "every guest is one ELF binary; output, registers (GPRs and RIP) and RAM are compared with the interpreter's run, the reference implementation.",
            "RAM may differ from KVM only in IOPL bits of RFLAGS images the guest saved: this nested KVM runs CPL3 code with IOPL=0 whatever RFLAGS says (docs/guest-abi.md).",
        ]
        if let s = r.translationSpeedup {
            notes.append("compute: the block translator is \(s.fixed(1))× faster than the interpreter (guest code runs as host code; the interpreter decodes once but dispatches every instruction).")
        }
        if let k = r.kvmSpeedupOverTranslation {
            notes.append("compute at CPL3: hardware virtualization is \(k.fixed(1))× faster than translation; on this nested host only CPL3 runs natively — CPL0 code is emulated by the host kernel, and every exit costs ~20 µs, so exit-heavy guests (pio-loop) run faster on the software engine, where an exit is a function return.")
        }
        notes.append("Benchmarks/qemu-compare.sh sets the translator beside QEMU TCG on the same compute guest.")
        return LabTable(title: "S13 one guest, three machines: KVM, block translator, interpreter",
                        columns: ["guest", "ring", "engine", "wall ms", "guest instructions", "MIPS", "output", "registers", "RAM"],
                        rows: rows, notes: notes)
    }

    package static func chart(_ r: Result) -> BarChart {
        var guests: [String] = []
        for row in r.rows where !guests.contains(row.guest) { guests.append(row.guest) }
        var engines: [String] = []
        for row in r.rows where !engines.contains(row.engine) { engines.append(row.engine) }
        let series = engines.map { e in
            (name: e, values: guests.map { g in (r.rows.first { $0.guest == g && $0.engine == e }?.seconds ?? 0) * 1e6 })
        }
        return BarChart(title: "S13 wall time per guest and engine", categories: guests, series: series, yLabel: "µs", logarithmic: true)
    }
}
