/// Settings a VM is created with, common to all engines.
public struct VMConfig: Sendable, Equatable {
    public var vcpuCount: Int
    /// A confidential VM (encrypted memory, `EncryptedMemory`); nil: an ordinary one.
    public var confidential: ConfidentialMode?
    /// Pages of the decrypted working set of a confidential VM.
    public var workingSetPages = 1024
    public init(vcpuCount: Int = 1, confidential: ConfidentialMode? = nil) {
        self.vcpuCount = vcpuCount; self.confidential = confidential
    }
}

/// How a guest reaches the VMM with a hypercall (docs/guest-abi.md).
public enum HypercallMechanism: Sendable, Equatable {
    /// `vmcall` (the software engine).
    case vmcall
    /// `out %eax, $port`: KVM keeps `vmcall` for itself, so a doorbell port stands in.
    case portDoorbell(UInt16)

    /// The boot-info `hypercall_kind` value.
    public var bootInfoKind: UInt32 {
        switch self {
        case .vmcall: return 0
        case .portDoorbell: return 1
        }
    }
}

/// An execution engine: KVM or the software x86-64 machine.
public protocol Engine: Sendable {
    /// Short name, as on the command line (`kvm`, `software`).
    var name: String { get }
    var hypercallMechanism: HypercallMechanism { get }
    /// Creates a VM whose RAM is `memory`.
    func makeVM(memory: GuestMemory, config: VMConfig) throws -> any VM
}

/// A virtual machine: RAM plus vCPUs.
/// What else a VM can do is a capability protocol (Capabilities.swift) it may adopt.
public protocol VM: AnyObject, Sendable {
    var memory: GuestMemory { get }
    /// The engine's `name`, for messages.
    var engineName: String { get }
    /// Creates vCPU `id` (0-based, below `config.vcpuCount`).
    func makeVCPU(id: Int) throws -> any VCPU
}

/// One virtual CPU. `run`, `state` and the completion calls belong to the vCPU's own
/// thread; only `requestExit` may be called from elsewhere.
public protocol VCPU: AnyObject, Sendable {
    var id: Int { get }
    /// Runs the guest until the next exit.
    func run() throws(VCPUError) -> VMExit
    func getState() throws -> VCPUState
    func setState(_ state: VCPUState) throws
    /// Supplies the value of the port or MMIO read that caused the last exit.
    func completeRead(value: UInt64)
    /// Supplies the data of the `rep ins` that caused the last `.stringPortIO` exit
    /// (`count × size` bytes).
    func completeStringRead(_ bytes: [UInt8])
    /// Supplies the result (guest RAX) of the hypercall that caused the last exit.
    func completeHypercall(result: UInt64)
    /// Makes a `run()` in progress return `.interrupted` soon, or the next one at once.
    /// Safe to call from any thread.
    func requestExit()
    /// Queues external interrupt `vector` (32–255), delivered through the guest's IDT once
    /// RFLAGS.IF is set and no STI/MOV SS shadow is in force — what a PIC or APIC presents.
    /// Safe from any thread; a `run()` in progress picks it up promptly.
    func injectInterrupt(vector: UInt8)
    /// True while an injected interrupt waits for delivery.
    var hasPendingInterrupt: Bool { get }
    /// RFLAGS.IF as of the last exit: a `hlt` with IF set waits for an interrupt, one with
    /// IF clear halts the vCPU for good.
    var interruptsEnabled: Bool { get }
}

extension VCPU {
    /// For engines whose string port reads arrive one element at a time.
    public func completeStringRead(_ bytes: [UInt8]) {
        completeRead(value: bytes.prefix(8).enumerated().reduce(0) { $0 | UInt64($1.element) << (8 * UInt64($1.offset)) })
    }
}
