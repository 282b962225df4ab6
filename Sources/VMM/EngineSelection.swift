import KVMEngine
import VirtCore
import X86Emulator

/// Which engine `swiftvisor run --engine …` asked for.
public enum EngineChoice: String, CaseIterable, Sendable {
    case kvm
    case software
}

public enum EngineSelection {
    /// Creates the chosen engine. `kvmPath` lets tests point KVM at a missing device;
    /// `translation: false` makes the software engine interpret every instruction.
    public static func make(_ choice: EngineChoice, kvmPath: String = "/dev/kvm", translation: Bool = true) throws -> any Engine {
        switch choice {
        case .kvm: return try KVMEngine(devicePath: kvmPath)
        case .software: return SoftwareEngine(translation: translation)
        }
    }

    /// Whether the software engine can run translated code on this host (it needs BMI2);
    /// otherwise it interprets every instruction.
    public static var softwareEngineTranslates: Bool { SoftwareEngine.translationSupported }

    /// KVM when it is usable, otherwise the software engine; `notice` says why it fell back.
    public static func makeDefault(kvmPath: String = "/dev/kvm", translation: Bool = true, notice: (String) -> Void) -> any Engine {
        do {
            return try KVMEngine(devicePath: kvmPath)
        } catch {
            notice("KVM unavailable (\(error)); using the software engine")
            return SoftwareEngine(translation: translation)
        }
    }
}
