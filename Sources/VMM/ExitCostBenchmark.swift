import Devices
import GuestImages
import Synchronization
import VirtCore

/// `swiftvisor bench exits`: the cost of one port-I/O exit round trip through the Swift
/// run loop (`Machine`) and through the shim's plain C KVM_RUN loop, on the same guest
/// (`pio-loop`) in the same process.
///
/// Each path runs the guest with `count=N` and with `count=0`; the difference divided by N
/// is the per-exit cost, so guest start-up (CPL0 set-up code, emulated slowly on nested
/// KVM) cancels out. The four runs are interleaved `repetitions` times; the fastest of each counts.
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

    public init(count: UInt64 = 50_000, repetitions: Int = 5, rings: [Int] = [0, 3], kvmPath: String = "/dev/kvm") {
        self.count = count; self.repetitions = repetitions; self.rings = rings; self.kvmPath = kvmPath
    }

    public func run(progress: (String) -> Void = { _ in }) throws -> [Row] {
        let engine = try EngineSelection.make(.kvm, kvmPath: kvmPath)
        guard let guest = BundledGuests.named("pio-loop") else { throw GuestProgramError.notFound("pio-loop") }
        let image = try ELFImage(bytes: guest.elf)
        var rows: [Row] = []
        for ring in rings {
            progress("CPL\(ring): \(repetitions) rounds of Swift loop and C loop, \(count) exits each")
            // Interleaved rounds, so drift in the host affects both paths alike; the
            // fastest of each kind counts.
            var swiftFull = UInt64.max, swiftEmpty = UInt64.max, cFull = UInt64.max, cEmpty = UInt64.max
            for _ in 0..<max(1, repetitions) {
                swiftFull = min(swiftFull, try swiftLoop(image, engine, count: count, ring: ring))
                cFull = min(cFull, try cLoop(image, engine, count: count, ring: ring))
                swiftEmpty = min(swiftEmpty, try swiftLoop(image, engine, count: 0, ring: ring))
                cEmpty = min(cEmpty, try cLoop(image, engine, count: 0, ring: ring))
            }
            let n = Double(count)
            rows.append(Row(ring: ring, exits: count,
                            swiftNanosecondsPerExit: max(1, Double(swiftFull) - Double(swiftEmpty)) / n,
                            cNanosecondsPerExit: max(1, Double(cFull) - Double(cEmpty)) / n))
        }
        return rows
    }

    private func machine(_ image: ELFImage, _ engine: any Engine, count: UInt64, ring: Int) throws -> Machine {
        try Machine(image: image, configuration: MachineConfiguration(memorySize: 16 << 20, commandLine: "count=\(count) ring=\(ring)"),
                    engine: engine, serialOutput: { _ in })
    }

    /// Nanoseconds for the whole guest run through `Machine.run()`.
    private func swiftLoop(_ image: ELFImage, _ engine: any Engine, count: UInt64, ring: Int) throws -> UInt64 {
        let m = try machine(image, engine, count: count, ring: ring)
        let result = try m.run()
        guard result.stopReason == .exitPort(status: 0), m.benchPort.writes == count else {
            throw BenchmarkError.guestMisbehaved("pio-loop: \(result.stopReason.summary), \(m.benchPort.writes) bench writes")
        }
        return result.wallNanoseconds
    }

    /// Nanoseconds for the whole guest run through the C loop.
    private func cLoop(_ image: ELFImage, _ engine: any Engine, count: UInt64, ring: Int) throws -> UInt64 {
        let m = try machine(image, engine, count: count, ring: ring)
        let vcpu = try m.vcpu(0).require(ReferenceRunLoop.self, .referenceRunLoop, engine: engine.name, neededBy: "the exit-cost benchmark")
        // On its own thread, as the Swift path's vCPU is, so both start equal.
        let outcome = Mutex<(UInt64, Result<(ioExits: UInt64, exitValue: UInt32), any Error>)?>(nil)
        let thread = HostThread(name: "vcpu0-c") {
            let start = monotonicNanoseconds()
            let r = Result { try vcpu.runReferenceLoop(exitPort: ExitPort.port) }
            outcome.withLock { $0 = (monotonicNanoseconds() - start, r) }
        }
        thread.join()
        let (elapsed, result) = outcome.withLock { $0 }!
        let r = try result.get()
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
