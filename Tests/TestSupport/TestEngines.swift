import Testing
import VirtCore
import VMM
#if canImport(Glibc)
import Glibc
#endif

/// Whether this host can run KVM guests; tests that need a real KVM skip with `noKVM` otherwise.
public let kvmUsable = access("/dev/kvm", R_OK | W_OK) == 0
public let noKVM = "needs a usable /dev/kvm (absent or not accessible on this host)"

extension Trait where Self == ConditionTrait {
    /// Runs the suite or test only where /dev/kvm is usable; `reason` says why KVM itself is needed.
    public static func requiresKVM(_ reason: String = noKVM) -> Self {
        .enabled(if: kvmUsable, Comment(rawValue: reason))
    }
}

/// The engines a machine test runs on: every one this host has, so a host without KVM
/// still runs the VMM's tests on the software engine instead of skipping them.
public enum TestEngines {
    public static var available: [EngineChoice] { kvmUsable ? [.kvm, .software] : [.software] }

    /// A fresh engine of `choice`; `translation: false` makes the software engine interpret.
    public static func make(_ choice: EngineChoice, translation: Bool = true) throws -> any Engine {
        try EngineSelection.make(choice, translation: translation)
    }
}
