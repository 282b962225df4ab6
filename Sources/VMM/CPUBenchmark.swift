import GuestImages
import KVMEngine
import VirtCore
import X86Emulator

/// `swiftvisor bench cpu`: the `compute` guest's integer workloads on the software engine
/// (guest instructions per second), and on KVM when it is usable (wall time only: its
/// guest runs those workloads natively at CPL3).
public struct CPUBenchmark: Sendable {
    public struct Row: Sendable {
        public var engine: String
        public var seconds: Double
        /// Guest instructions retired (software engine only).
        public var instructions: UInt64?
        public var mips: Double? { instructions.map { Double($0) / seconds / 1e6 } }
    }

    public var scale: Int
    public var kvmPath: String

    public init(scale: Int = 1, kvmPath: String = "/dev/kvm") {
        self.scale = scale
        self.kvmPath = kvmPath
    }

    public func run(progress: (String) -> Void = { _ in }) throws -> [Row] {
        guard let guest = BundledGuests.named("compute") else { throw GuestProgramError.notFound("compute") }
        let image = try ELFImage(bytes: guest.elf)
        var rows: [Row] = []
        progress("software engine: compute scale=\(scale)")
        let (softwareSeconds, machine) = try time(image, SoftwareEngine())
        let instructions = (machine.vcpu(0) as? SoftwareVirtualCPU)?.instructionsRetired
        rows.append(Row(engine: "software", seconds: softwareSeconds, instructions: instructions))
        if let kvm = try? KVMEngine(devicePath: kvmPath) {
            progress("kvm engine: compute scale=\(scale)")
            rows.append(Row(engine: "kvm", seconds: try time(image, kvm).0, instructions: nil))
        }
        return rows
    }

    private func time(_ image: ELFImage, _ engine: any Engine) throws -> (Double, Machine) {
        let m = try Machine(image: image, configuration: MachineConfiguration(memorySize: 64 << 20, commandLine: "scale=\(scale)"),
                            engine: engine, serialOutput: { _ in })
        let r = try m.run()
        guard r.stopReason == .exitPort(status: 0) else {
            throw BenchmarkError.guestMisbehaved("compute on \(engine.name): \(r.stopReason.summary)")
        }
        return (Double(r.wallNanoseconds) / 1e9, m)
    }
}
