/// Why the current instruction stopped before completing. Thrown with typed throws, so
/// raising one costs no allocation. Faults are restartable: RIP still points at the
/// instruction and no architectural state was committed (writes come last).
enum Fault: Error {
    /// A guest exception: vector and optional error code (CR2 already set for #PF).
    case exception(vector: UInt8, errorCode: UInt32?)
    /// INT n / INT3 / INT1: delivered as a trap, RIP already past the instruction
    /// (`length` bytes long: an exception raised by the delivery is a fault of the
    /// instruction, reported at its first byte). `checkDPL`: the gate's DPL must allow
    /// the current privilege level (not for INT1).
    case softwareInterrupt(vector: UInt8, checkDPL: Bool, length: UInt8)
    /// The instruction needs a value from an MMIO read the VMM must supply first.
    case mmioRead(address: UInt64, size: UInt8)
    /// Instruction fetch from a guest-physical address with no RAM behind it (KVM reports
    /// this as an emulation failure).
    case fetchOutsideRAM(gpa: UInt64)
    /// EPT violation: the second-level page table forbids this access to `gpa`.
    case secondLevelViolation(gpa: UInt64, access: UInt8)
    /// Shadow mode: the shadow tables lack the translation or forbid the access; the VMM
    /// decides (`ShadowPagingEvent.pageFault`). CR2 is untouched.
    case shadowFault(linear: UInt64, errorCode: UInt32)

    static let de = Fault.exception(vector: 0, errorCode: nil)
    static let ud = Fault.exception(vector: 6, errorCode: nil)
    static func gp(_ code: UInt32 = 0) -> Fault { .exception(vector: 13, errorCode: code) }
    static func ss(_ code: UInt32 = 0) -> Fault { .exception(vector: 12, errorCode: code) }
}
