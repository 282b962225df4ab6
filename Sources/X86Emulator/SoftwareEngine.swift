import Synchronization
import VirtCore

/// The software x86-64 engine: an interpreter that runs the same guests as KVM and
/// returns the same exits. Works without /dev/kvm.
public struct SoftwareEngine: Engine {
    public init() {}
    public var name: String { "software" }
    public var hypercallMechanism: HypercallMechanism { .vmcall }

    public func makeVM(memory: GuestMemory, config: VMConfig) throws -> any VM {
        SoftwareVirtualMachine(memory: memory, config: config)
    }
}

public final class SoftwareVirtualMachine: VM, @unchecked Sendable {
    public let memory: GuestMemory
    public let config: VMConfig
    let atomicLock = AtomicInstructionLock()

    init(memory: GuestMemory, config: VMConfig) {
        self.memory = memory
        self.config = config
    }

    public func makeVCPU(id: Int) throws -> any VCPU { SoftwareVirtualCPU(vm: self, id: id) }
}

/// One interpreted vCPU. `run`, state and completions belong to its thread;
/// `requestExit` and `injectInterrupt` may come from any thread.
public final class SoftwareVirtualCPU: VCPU, @unchecked Sendable {
    public let id: Int
    let vm: SoftwareVirtualMachine
    let cpu: CPU
    private let exitRequested = Atomic<Bool>(false)
    /// Vector waiting for RFLAGS.IF (one, like KVM_INTERRUPT without an irqchip).
    private let pendingInterrupt = Atomic<Int>(-1)
    /// Instructions left before `.preemptionTimer` (nil: timer off).
    public var preemptionBudget: UInt64?
    /// Guest exceptions raised (including #UD for unsupported encodings).
    public private(set) var exceptionCount: UInt64 = 0

    init(vm: SoftwareVirtualMachine, id: Int) {
        self.vm = vm
        self.id = id
        cpu = CPU(memory: vm.memory, atomicLock: vm.atomicLock)
    }

    /// Instructions retired so far.
    public var instructionsRetired: UInt64 { cpu.instructions }

    public func getState() throws -> VCPUState { cpu.save() }
    public func setState(_ state: VCPUState) throws { cpu.load(state) }

    public func completeRead(value: UInt64) {
        if cpu.pendingInSize != 0 {
            let size = cpu.pendingInSize
            cpu.pendingInSize = 0
            let v = value & CPU.mask(size)
            switch size {
            case 1: cpu.gpr[0] = (cpu.gpr[0] & ~0xFF) | v
            case 2: cpu.gpr[0] = (cpu.gpr[0] & ~0xFFFF) | v
            default: cpu.gpr[0] = v  // 32-bit results zero-extend
            }
        } else if cpu.awaitingInsValue {
            cpu.awaitingInsValue = false
            cpu.pendingInsValue = value
        } else if let last = lastMMIORead {
            cpu.pendingMMIORead = (last.address, last.size, value & CPU.mask(Int(last.size)))
        }
        lastMMIORead = nil
    }

    private var lastMMIORead: (address: UInt64, size: UInt8)?

    public func completeHypercall(result: UInt64) { cpu.gpr[0] = result }

    public func requestExit() { exitRequested.store(true, ordering: .releasing) }

    /// Queues an external interrupt, delivered when RFLAGS.IF allows (as KVM_INTERRUPT).
    public func injectInterrupt(vector: UInt8) { pendingInterrupt.store(Int(vector), ordering: .releasing) }

    public func run() throws -> VMExit {
        var sinceCheck = 0
        while true {
            if sinceCheck == 0 || cpu.interruptShadow {
                sinceCheck = 1024
                if exitRequested.exchange(false, ordering: .acquiring) { return .interrupted }
                if cpu.interruptShadow {
                    sinceCheck = 1  // look again right after the shadowed instruction
                } else if cpu.rflags & Flag.if != 0, pendingInterrupt.load(ordering: .relaxed) >= 0 {
                    let v = pendingInterrupt.exchange(-1, ordering: .acquiring)
                    if v >= 0, !raise(vector: UInt8(v), errorCode: nil, software: false) { return .shutdown }
                }
            }
            sinceCheck -= 1
            let shadowed = cpu.interruptShadow
            if let budget = preemptionBudget {
                if budget == 0 { preemptionBudget = nil; return .preemptionTimer }
                preemptionBudget = budget - 1
            }
            let faultRIP = cpu.rip
            do throws(Fault) {
                let outcome = try cpu.step()
                if shadowed { cpu.interruptShadow = false }
                switch outcome {
                case .next: continue
                case let .exit(e):
                    if case .halt = e, cpu.rflags & Flag.if != 0, pendingInterrupt.load(ordering: .relaxed) >= 0 {
                        sinceCheck = 0
                        continue
                    }
                    return e
                }
            } catch {
                switch error {
                case let .mmioRead(address, size):
                    lastMMIORead = (address, size)
                    return .mmio(MMIOAccess(address: address, size: size, direction: .read))
                case let .exception(vector, code):
                    exceptionCount &+= 1
                    // INT3 and INT n arrive with RIP already past the instruction (traps);
                    // everything else the interpreter raises is a fault at the instruction.
                    let software = cpu.rip != faultRIP
                    if !raise(vector: vector, errorCode: code, software: software, fault: !software) {
                        return .shutdown
                    }
                }
            }
        }
    }

    /// Delivers a vector, escalating a failed delivery to #DF and a failed #DF to a triple
    /// fault. Returns false on triple fault.
    private func raise(vector: UInt8, errorCode: UInt32?, software: Bool, fault: Bool = false) -> Bool {
        do throws(Fault) {
            try cpu.deliver(vector: vector, errorCode: errorCode, software: software, fault: fault)
            return true
        } catch {
            guard vector != 8 else { return false }
            do throws(Fault) {
                try cpu.deliver(vector: 8, errorCode: 0, software: false, fault: false)
                return true
            } catch {
                return false
            }
        }
    }
}
