import GuestImages
import VirtCore

/// `swiftvisor bench cpu`: the `compute` guest's integer workloads on the software engine
/// (guest instructions per second), and on KVM when it is usable (wall time only: its
/// guest runs those workloads natively at CPL3).
public struct CPUBenchmark: Sendable {
    public struct Row: Sendable, Codable {
        public var engine: String
        public var seconds: Double
        /// Guest instructions retired (software engine only).
        public var instructions: UInt64?
        /// Share of the instructions that ran as translated code (translated software engine).
        public var translatedShare: Double?
        public var mips: Double? { instructions.map { Double($0) / seconds / 1e6 } }
    }

    public var scale: Int
    public var kvmPath: String
    /// Also run the software engine with translation off.
    public var interpreted: Bool
    /// Also run the translated software engine with shadow paging (scenario S5).
    public var shadowPaging = true
    /// Also run the translated software engine as a confidential VM (SEV-SNP, scenario S11).
    public var confidential = true

    public init(scale: Int = 1, kvmPath: String = "/dev/kvm", interpreted: Bool = true) {
        self.scale = scale
        self.kvmPath = kvmPath
        self.interpreted = interpreted
    }

    public func run(progress: (String) -> Void = { _ in }) throws -> [Row] {
        guard let guest = BundledGuests.named("compute") else { throw GuestProgramError.notFound("compute") }
        let image = try ELFImage(bytes: guest.elf)
        var rows: [Row] = []
        progress("software engine (translated): compute scale=\(scale)")
        let (softwareSeconds, machine) = try time(image, EngineSelection.make(.software, translation: true))
        let summary = machine.executionCounts
        rows.append(Row(engine: "software", seconds: softwareSeconds, instructions: summary?.instructions,
                        translatedShare: summary.flatMap { $0.translating && $0.instructions > 0 ? $0.translatedShare : nil }))
        if shadowPaging {
            progress("software engine (translated, shadow paging): compute scale=\(scale)")
            let (seconds, m) = try time(image, EngineSelection.make(.software, translation: true), paging: .shadow)
            let counts = m.executionCounts
            rows.append(Row(engine: "software-shadow", seconds: seconds, instructions: counts?.instructions,
                            translatedShare: counts.flatMap { $0.translating && $0.instructions > 0 ? $0.translatedShare : nil }))
        }
        if confidential {
            progress("software engine (translated, confidential SEV-SNP): compute scale=\(scale)")
            let (seconds, m) = try time(image, EngineSelection.make(.software, translation: true), confidential: .snp)
            let counts = m.executionCounts
            rows.append(Row(engine: "software-confidential", seconds: seconds, instructions: counts?.instructions,
                            translatedShare: counts.flatMap { $0.translating && $0.instructions > 0 ? $0.translatedShare : nil }))
        }
        if interpreted {
            progress("software engine (interpreted): compute scale=\(scale)")
            let (seconds, m) = try time(image, EngineSelection.make(.software, translation: false))
            rows.append(Row(engine: "software-interpreted", seconds: seconds, instructions: m.executionCounts?.instructions))
        }
        if let kvm = try? EngineSelection.make(.kvm, kvmPath: kvmPath) {
            progress("kvm engine: compute scale=\(scale)")
            rows.append(Row(engine: "kvm", seconds: try time(image, kvm).0, instructions: nil))
        }
        return rows
    }

    private func time(_ image: ELFImage, _ engine: any Engine, paging: PagingMode = .nested,
                      confidential: ConfidentialMode? = nil) throws -> (Double, Machine) {
        var config = MachineConfiguration(memorySize: 64 << 20, commandLine: "scale=\(scale)")
        config.paging = paging
        config.confidential = confidential
        let m = try Machine(image: image, configuration: config, engine: engine, serialOutput: { _ in })
        let r = try m.run()
        guard r.stopReason == .exitPort(status: 0) else {
            throw BenchmarkError.guestMisbehaved("compute on \(engine.name): \(r.stopReason.summary)")
        }
        return (Double(r.wallNanoseconds) / 1e9, m)
    }
}
