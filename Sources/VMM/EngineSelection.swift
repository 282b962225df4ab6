import KVMEngine
import VirtCore

/// Which engine `swiftvisor run --engine …` asked for.
public enum EngineChoice: String, CaseIterable, Sendable {
    case kvm
}

public enum EngineSelection {
    /// Creates the chosen engine. `kvmPath` lets tests point KVM at a missing device.
    public static func make(_ choice: EngineChoice, kvmPath: String = "/dev/kvm") throws -> any Engine {
        switch choice {
        case .kvm: return try KVMEngine(devicePath: kvmPath)
        }
    }
}
