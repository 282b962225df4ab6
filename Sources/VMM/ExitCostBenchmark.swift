import Devices
import GuestImages
import KVMEngine
import VirtCore

/// `swiftvisor bench exits`: the cost of one port-I/O exit round trip through the Swift
/// run loop (`Machine`) and through the shim's plain C KVM_RUN loop, on the same guest
/// (`pio-loop`) in the same process.
///
/// Each path runs the guest with `count=N` and with `count=0`; the difference divided by N
/// is the per-exit cost, so guest start-up (CPL0 set-up code, emulated slowly on nested
/// KVM) cancels out. Each measurement is the fastest of `repetitions`.
public struct ExitCostBenchmark: Sendable {
    public struct Row: Sendable, Codable {
        public var ring: Int
        public var exits: UInt64
        public var swiftNanosecondsPerExit: Double
        public var cNanosecondsPerExit: Double
        public var ratio: Double { swiftNanosecondsPerExit / cNanosecondsPerExit }
    }

    public var count: UInt64
    public var repetitions: Int
    public var rings: [Int]
    public var kvmPath: String

    public init(count: UInt64 = 50_000, repetitions: Int = 3, rings: [Int] = [0, 3], kvmPath: String = "/dev/kvm") {
        self.count = count; self.repetitions = repetitions; self.rings = rings; self.kvmPath = kvmPath
    }

    public func run(progress: (String) -> Void = { _ in }) throws -> [Row] {
        let engine = try KVMEngine(devicePath: kvmPath)
        guard let guest = BundledGuests.named("pio-loop") else { throw GuestProgramError.notFound("pio-loop") }
        let image = try ELFImage(bytes: guest.elf)
        var rows: [Row] = []
        for ring in rings {
            progress("CPL\(ring): Swift run loop, \(count) exits × \(repetitions)")
            let swiftFull = try best { try swiftLoop(image, engine, count: count, ring: ring) }
            let swiftEmpty = try best { try swiftLoop(image, engine, count: 0, ring: ring) }
            progress("CPL\(ring): C reference loop, \(count) exits × \(repetitions)")
            let cFull = try best { try cLoop(image, engine, count: count, ring: ring) }
            let cEmpty = try best { try cLoop(image, engine, count: 0, ring: ring) }
            let n = Double(count)
            rows.append(Row(ring: ring, exits: count,
                            swiftNanosecondsPerExit: max(1, Double(swiftFull) - Double(swiftEmpty)) / n,
                            cNanosecondsPerExit: max(1, Double(cFull) - Double(cEmpty)) / n))
        }
        return rows
    }

    private func best(_ body: () throws -> UInt64) throws -> UInt64 {
        var m = UInt64.max
        for _ in 0..<max(1, repetitions) { m = min(m, try body()) }
        return m
    }

    private func machine(_ image: ELFImage, _ engine: KVMEngine, count: UInt64, ring: Int) throws -> Machine {
        try Machine(image: image, configuration: MachineConfiguration(memorySize: 16 << 20, commandLine: "count=\(count) ring=\(ring)"),
                    engine: engine, serialOutput: { _ in })
    }

    /// Nanoseconds for the whole guest run through `Machine.run()`.
    private func swiftLoop(_ image: ELFImage, _ engine: KVMEngine, count: UInt64, ring: Int) throws -> UInt64 {
        let m = try machine(image, engine, count: count, ring: ring)
        let result = try m.run()
        guard result.stopReason == .exitPort(status: 0), m.benchPort.writes == count else {
            throw BenchmarkError.guestMisbehaved("pio-loop: \(result.stopReason.summary), \(m.benchPort.writes) bench writes")
        }
        return result.wallNanoseconds
    }

    /// Nanoseconds for the whole guest run through the C loop.
    private func cLoop(_ image: ELFImage, _ engine: KVMEngine, count: UInt64, ring: Int) throws -> UInt64 {
        let m = try machine(image, engine, count: count, ring: ring)
        guard let vcpu = m.vcpu(0) as? KVMVirtualCPU else { throw BenchmarkError.guestMisbehaved("not a KVM vCPU") }
        let start = monotonicNanoseconds()
        let r = try vcpu.runReferenceIOLoop(exitPort: ExitPort.port)
        let elapsed = monotonicNanoseconds() - start
        // The C loop counts every non-exit port write (serial output too), so ≥ count.
        guard r.exitValue == 0, r.ioExits >= count else {
            throw BenchmarkError.guestMisbehaved("pio-loop under the C loop: exit value \(r.exitValue), \(r.ioExits) exits")
        }
        return elapsed
    }
}

public enum BenchmarkError: Error, CustomStringConvertible {
    case guestMisbehaved(String)
    public var description: String {
        switch self { case let .guestMisbehaved(s): return "benchmark guest misbehaved: \(s)" }
    }
}
