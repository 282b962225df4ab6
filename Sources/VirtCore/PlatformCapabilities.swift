/// The VMM's answer to model-specific registers an engine leaves to the platform: the
/// x2APIC registers (0x800–0x8FF), the TSC deadline (0x6E0) and IA32_APIC_BASE (0x1B, after
/// the engine's reserved-bit check; false refuses the APIC mode change) belong to a local
/// APIC the VMM models. Called on the vCPU's own thread, in the middle of RDMSR/WRMSR.
public protocol PlatformMSRHandler: AnyObject, Sendable {
    /// The register's value, or nil for #GP. `tsc`: the vCPU's time-stamp counter now;
    /// `apicBase`: its IA32_APIC_BASE (x2APIC mode is bit 10).
    func readMSR(vcpu: Int, index: UInt32, tsc: UInt64, apicBase: UInt64) -> UInt64?
    /// False for #GP.
    func writeMSR(vcpu: Int, index: UInt32, value: UInt64, tsc: UInt64, apicBase: UInt64) -> Bool
    /// Whether the local APIC has x2APIC mode (the engine's CPUID.1:ECX.x2APIC).
    var x2APICAvailable: Bool { get }
}

extension PlatformMSRHandler {
    public var x2APICAvailable: Bool { true }
}

/// A local interrupt controller in the VMM that decides which requested vector a vCPU may
/// take (processor priority: TPR and the highest in-service vector) and learns when it
/// took one (the vector moves from requested to in service). Called on the vCPU's thread.
public protocol PlatformInterruptController: AnyObject, Sendable {
    /// Only vectors whose priority class (vector >> 4) is above this one's class are taken.
    func processorPriority(vcpu: Int) -> UInt8
    func acknowledge(vcpu: Int, vector: UInt8)
    /// CR8: the task priority's class (TPR[7:4]), read and written.
    func taskPriorityClass(vcpu: Int) -> UInt8
    func setTaskPriorityClass(vcpu: Int, _ value: UInt8)
    /// The timer deadline armed with `PlatformTimerForwarding.setTimerDeadline` passed;
    /// `tsc`: the vCPU's time-stamp counter now.
    func timerDeadlineReached(vcpu: Int, tsc: UInt64)
}

extension PlatformInterruptController {
    public func timerDeadlineReached(vcpu: Int, tsc: UInt64) {}
}

/// A vCPU on whose own time-stamp counter the platform's timer counts, as KVM's local APIC
/// timer shares the guest TSC's clock: the engine reports the deadline once its TSC reaches
/// it, and a `hlt` with interrupts enabled waits out the time to it (host time then passes
/// for guest time), so what the guest measures does not depend on host load.
public protocol PlatformTimerForwarding: PlatformMSRForwarding {
    /// Arms (nil: disarms) the timer deadline, in TSC ticks. On the vCPU's own thread.
    func setTimerDeadline(_ tsc: UInt64?)
}

/// A vCPU whose unimplemented MSRs go to a `PlatformMSRHandler` (the software engine;
/// KVM keeps them in its in-kernel local APIC). Set before the vCPU runs.
public protocol PlatformMSRForwarding: VCPU {
    func setPlatformMSRHandler(_ handler: (any PlatformMSRHandler)?)
    /// Interrupts injected into this vCPU are then taken by priority and acknowledged.
    func setInterruptController(_ controller: (any PlatformInterruptController)?)
    /// The vCPU's time-stamp counter (from its own thread, or while it does not run).
    var timeStampCounter: UInt64 { get }
}
