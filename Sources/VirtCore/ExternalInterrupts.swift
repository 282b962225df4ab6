/// An interrupt controller outside the local APIC whose requests reach a vCPU as ExtINT
/// (the 8259 pair behind the boot CPU's LINT0): the vCPU learns only that one is requested,
/// and asks for the vector when it takes it — the interrupt-acknowledge cycle, which moves
/// the request into service, so the controller's masks and priorities as they stand then
/// decide. Called on the vCPU's thread.
public protocol ExternalInterruptController: AnyObject, Sendable {
    /// The vector to take now, or nil when the local APIC no longer passes ExtINT.
    func acknowledgeExternalInterrupt(vcpu: Int) -> UInt8?
}

/// A vCPU that takes ExtINT requests: while one is asserted and RFLAGS.IF allows, the
/// engine acknowledges it to the controller and delivers the vector it answers.
public protocol ExternalInterruptInput: VCPU {
    /// Set before the vCPU runs.
    func setExternalInterruptController(_ controller: (any ExternalInterruptController)?)
    /// The request line's level (any thread); asserting it wakes a vCPU that waits to be interrupted.
    func setExternalInterruptRequest(_ asserted: Bool)
}
