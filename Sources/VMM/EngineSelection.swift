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

    /// What /dev/kvm at `kvmPath` offers (`swiftvisor host`); throws when it is unusable.
    public static func kvmHostReport(kvmPath: String = "/dev/kvm") throws -> HostKVMReport {
        let r = try KVMSystem(path: kvmPath).report()
        return HostKVMReport(path: r.path, apiVersion: Int(r.apiVersion), recommendedVCPUs: r.recommendedVCPUs, maxVCPUs: r.maxVCPUs,
                             capabilities: r.capabilities.map { .init(name: $0.capability.name, value: Int($0.value), required: $0.capability.required) })
    }

    /// The engine capabilities (Capabilities.swift) a VM of `choice` offers on this host.
    public static func capabilities(of choice: EngineChoice, kvmPath: String = "/dev/kvm") throws -> [EngineCapability] {
        let engine = try make(choice, kvmPath: kvmPath)
        let vm = try engine.makeVM(memory: try GuestMemory(size: 2 << 20), config: VMConfig())
        var caps = vm.capabilities
        let vcpu = try vm.makeVCPU(id: 0)
        if vcpu is any PreemptionTimer { caps.append(.preemptionTimer) }
        if vcpu is any InstructionCounting { caps.append(.instructionCounting) }
        if vcpu is any ReferenceRunLoop { caps.append(.referenceRunLoop) }
        return caps
    }

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

/// /dev/kvm as `swiftvisor host` reports it.
public struct HostKVMReport: Sendable, Codable {
    public struct Capability: Sendable, Codable {
        public var name: String
        public var value: Int
        public var required: Bool
    }
    public var path: String
    public var apiVersion: Int
    public var recommendedVCPUs: Int
    public var maxVCPUs: Int
    public var capabilities: [Capability]
}
