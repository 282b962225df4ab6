import VirtCore

/// How fast an engine runs guest ring-0 code, measured with a short loop. KVM nested in a
/// VM whose hypervisor does not run the nested guest's CPL0 code natively emulates every
/// such instruction (~1000× slower than CPL3 code); a kernel that boots in seconds
/// elsewhere then takes hours. `run --kernel` asks before it picks an engine.
public enum RingZeroProbe {
    /// Below this many ring-0 instructions a second the engine is treated as emulating them
    /// (real VT-x runs ~10⁹; this host's nested KVM ~10⁶).
    public static let emulatedBelow: Double = 50e6

    /// Loop iterations: two instructions each, ~2 µs on hardware, tens of ms when emulated.
    static let iterations: UInt32 = 2_000

    /// Ring-0 instructions per second on `engine`, from one run of the loop (a fresh VM).
    public static func instructionsPerSecond(on engine: any Engine) throws -> Double {
        let memory = try GuestMemory(size: BootLayout.minRAM)
        try BootLayout.prepare(memory: memory, vcpuCount: 1, commandLine: "", hypercall: engine.hypercallMechanism)
        // mov ecx, N; L: dec ecx; jnz L; out 0x80, al; hlt
        let n = withUnsafeBytes(of: iterations.littleEndian) { Array($0) }
        let code: [UInt8] = [0xB9] + n + [0xFF, 0xC9, 0x75, 0xFC, 0xE6, 0x80, 0xF4]
        try memory.write(code, at: BootLayout.imageBase)
        let vm = try engine.makeVM(memory: memory, config: VMConfig(vcpuCount: 1))
        let vcpu = try vm.makeVCPU(id: 0)
        try vcpu.setState(BootLayout.initialState(vcpu: 0, entry: BootLayout.imageBase))
        let started = monotonicNanoseconds()
        // The loop's end is the port write; anything else (a timer tick, an interrupted
        // run) is run again, a bounded number of times.
        for _ in 0..<1000 {
            if case let .portIO(access) = try vcpu.run(), access.port == 0x80 {
                let seconds = Double(monotonicNanoseconds() - started) / 1e9
                return Double(2 * iterations + 2) / max(seconds, 1e-9)
            }
        }
        throw RingZeroProbeError.noResult
    }

    /// Whether `engine` runs ring-0 code at hardware speed; false when it is emulated here.
    public static func runsRingZeroNatively(_ engine: any Engine) -> Bool {
        guard let rate = try? instructionsPerSecond(on: engine) else { return false }
        return rate >= emulatedBelow
    }
}

public enum RingZeroProbeError: Error, CustomStringConvertible {
    case noResult
    public var description: String { "the ring-0 probe loop did not finish" }
}

extension EngineSelection {
    /// The engine for a kernel (which runs mostly in ring 0): `requested` if given, else KVM
    /// when it runs ring-0 code natively, else the software engine. `notice` says why KVM
    /// was passed over, or warns when a requested KVM emulates ring 0.
    public static func forKernel(requested: EngineChoice?, kvmPath: String = "/dev/kvm", translation: Bool = true,
                                 notice: (String) -> Void) throws -> any Engine {
        if requested == .software { return try make(.software, translation: translation) }
        let kvm: any Engine
        do { kvm = try make(.kvm, kvmPath: kvmPath, translation: translation) } catch {
            if requested == .kvm { throw error }
            notice("KVM unavailable (\(error)); using the software engine")
            return try make(.software, translation: translation)
        }
        let rate = try? RingZeroProbe.instructionsPerSecond(on: kvm)
        guard let rate, rate < RingZeroProbe.emulatedBelow else { return kvm }
        let measured = "this host's KVM runs guest ring-0 code emulated (\((rate / 1e6).fixed(1)) M instructions/s, nested virtualization)"
        if requested == .kvm {
            notice("\(measured): the kernel will run about 1000× slower than on hardware and may take hours to reach its console; --engine software runs it in seconds")
            return kvm
        }
        notice("\(measured); using the software engine for the kernel (--engine kvm to insist)")
        return try make(.software, translation: translation)
    }
}
