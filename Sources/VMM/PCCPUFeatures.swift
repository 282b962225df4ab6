/// CPU features of the PC platform a kernel may ask to change, the way QEMU's
/// `-cpu MODEL,+flag,-flag` does (kvm-unit-tests' `xapic` entry runs with `-x2apic`).
/// Only what the platform decides is here; the rest of CPUID is the engine's.
public struct PCCPUFeatures: Codable, Sendable, Equatable {
    /// x2APIC mode of the local APICs (CPUID.1:ECX.x2APIC); without it IA32_APIC_BASE.EXTD
    /// cannot be set (#GP), as on an xAPIC-only processor.
    public var x2APIC = true

    public init() {}

    /// Parses `+x2apic`, `-x2apic` and `+tsc-deadline` (always present), comma-separated.
    public init(parsing list: String) throws(PCCPUFeatureError) {
        for flag in list.split(separator: ",") {
            let name = flag.dropFirst()
            switch (flag.first, name) {
            case ("+", "x2apic"): x2APIC = true
            case ("-", "x2apic"): x2APIC = false
            case ("+", "tsc-deadline"): break
            default: throw PCCPUFeatureError(flag: String(flag))
            }
        }
    }
}

public struct PCCPUFeatureError: Error, CustomStringConvertible, Sendable {
    public let flag: String
    public var description: String {
        "unsupported CPU feature flag '\(flag)' (known: +x2apic, -x2apic, +tsc-deadline)"
    }
}
