import Dispatch
import Synchronization
import VirtCore

/// The software x86-64 engine: runs the same guests as KVM and returns the same exits,
/// without /dev/kvm — guest blocks translated to host code where possible, the rest (and
/// everything, with `translation: false`) interpreted. See docs/software-engine.md.
public struct SoftwareEngine: Engine {
    /// Run guest code through the block translator where it can (on hosts with BMI2);
    /// otherwise, and always when false, interpret every instruction.
    public var translation: Bool

    public init(translation: Bool = true) { self.translation = translation }
    public var name: String { "software" }
    public var hypercallMechanism: HypercallMechanism { .vmcall }

    /// Whether this host can run translated code at all.
    public static var translationSupported: Bool { BlockTranslator.hostSupported }

    public func makeVM(memory: GuestMemory, config: VMConfig) throws -> any VM {
        try SoftwareVirtualMachine(memory: memory, config: config, translation: translation)
    }
}

// SAFETY: every stored property is immutable; the shared tables inside synchronise themselves.
public final class SoftwareVirtualMachine: DirtyPageLogging, FrameRemapping, CodeCacheCoherence, @unchecked Sendable {
    public let memory: GuestMemory
    public let config: VMConfig
    let atomicLock = AtomicInstructionLock()
    let codePages: CodePages
    /// The EPT model: permissions and accessed/dirty flags per guest page.
    public let secondLevel: SecondLevelPageTable

    /// Translated execution requested (see `SoftwareEngine.translation`).
    let translation: Bool
    /// Shadow mode: the VM-wide TLB shootdown, and the shadow pools the vCPUs walk (kept
    /// alive here).
    let shadowSync: ShadowFlushSync
    let shadowPools = Mutex<[ShadowPageTablePool]>([])
    /// A confidential VM's memory path (`VMConfig.confidential`; Confidential/).
    let confidential: ConfidentialMemory?

    init(memory: GuestMemory, config: VMConfig, translation: Bool) throws {
        self.memory = memory
        self.config = config
        self.translation = translation
        codePages = CodePages(ramSize: memory.size)
        secondLevel = SecondLevelPageTable(ramSize: memory.size)
        shadowSync = ShadowFlushSync(vcpuCount: config.vcpuCount)
        confidential = try config.confidential.map { mode throws in
            guard config.vcpuCount == 1 else { throw ConfidentialError("a confidential VM has one vCPU on the software engine") }
            return try ConfidentialMemory(memory: memory, mode: mode, capacity: config.workingSetPages)
        }
    }

    public var engineName: String { "software" }
    public func makeVCPU(id: Int) throws -> any VCPU { SoftwareVirtualCPU(vm: self, id: id) }

    /// The second-level dirty flags are always kept; enabling only clears them.
    public func setDirtyLogging(_ enabled: Bool) throws {
        if enabled { _ = secondLevel.collectDirty() }
    }

    public func fetchDirtyLog() throws -> DirtyBitmap { secondLevel.collectDirty() }

    /// Forgets decoded instructions after the VMM wrote guest memory behind the vCPUs'
    /// backs (loading code, restoring a snapshot, DMA into code pages). Guest writes,
    /// from any vCPU, are tracked by the engine itself. Call while no vCPU runs.
    public func hostDidWriteAll() {
        codePages.invalidateAll()
        dropWorkingSet(nil)
    }

    /// As `hostDidWriteAll()`, for `[gpa, gpa+length)` only.
    public func hostDidWrite(gpa: UInt64, length: UInt64) {
        codePages.invalidate(gpa: gpa, length: length)
        if length > 0 { dropWorkingSet(Int(gpa >> 12)..<Int((gpa &+ length &- 1) >> 12) + 1) }
    }

    public var secondLevelPageCount: Int { secondLevel.pageCount }
    public func permissions(page: Int) -> PagePermissions { secondLevel.permissions(page: page) }
    public func setPermissions(_ permissions: PagePermissions, pages: Range<Int>) { secondLevel.setPermissions(permissions, pages: pages) }
    public func frame(of page: Int) -> Int { secondLevel.frame(of: page) }
    public func map(page: Int, toFrame frame: Int, permissions: PagePermissions) {
        secondLevel.map(page: page, toFrame: frame, permissions: permissions)
    }
}

/// One software vCPU. `run`, state and completions belong to its thread;
/// `requestExit` and `injectInterrupt` may come from any thread.
// SAFETY: the CPU and the timer budget belong to the thread calling run(); the flags other
// threads touch (exit request, pending interrupts) are atomic.
public final class SoftwareVirtualCPU: PreemptionTimer, InstructionCounting, PlatformTimerForwarding, ExternalInterruptInput, @unchecked Sendable {
    public let id: Int
    let vm: SoftwareVirtualMachine
    let cpu: CPU
    private let exitRequested = Atomic<Bool>(false)
    /// Vectors waiting for RFLAGS.IF.
    private let pending = PendingInterrupts()
    /// An ExtINT request (the 8259's INTR through LINT0): its vector comes from the
    /// controller when it is taken.
    private let externalRequest = Atomic<Bool>(false)
    private var externalController: (any ExternalInterruptController)?
    /// NMIs (injected as vector 2) waiting for NMI blocking to end; IF does not hold them.
    /// At most two wait at once, as KVM keeps them (two sent together are both taken); while
    /// an NMI handler runs, or once one is taken, at most one (SDM Vol. 3A §6.7.1).
    private let nmiPending = Atomic<Int>(0)
    /// An NMI handler runs (`cpu.nmiBlocked`, as other threads see it): one more NMI may wait.
    private let nmiMasked = Atomic<Bool>(false)
    /// `hlt` waiting for the platform timer (GuestTimer.swift): set while the thread waits
    /// on `idleWake`, which injections and exit requests then signal.
    let idle = Atomic<Bool>(false)
    let idleWake = DispatchSemaphore(value: 0)

    /// The model of the VMX preemption timer: instructions (attempts, including ones that
    /// fault) left before `run()` returns `.preemptionTimer`; nil: timer off. It fires once
    /// and disarms itself.
    public var preemptionBudget: UInt64?

    /// Instructions to run between looks at `requestExit` and pending interrupts.
    static let blockSize = 8192

    init(vm: SoftwareVirtualMachine, id: Int) {
        self.vm = vm
        self.id = id
        cpu = CPU(memory: vm.memory, codePages: vm.codePages, secondLevel: vm.secondLevel, atomicLock: vm.config.vcpuCount > 1 ? vm.atomicLock : nil,
                  confidential: vm.confidential)
        if vm.translation { cpu.translator = BlockTranslator(sharedMemory: vm.config.vcpuCount > 1) }
        cpu.vcpuIndex = id
    }

    public func setPlatformMSRHandler(_ handler: (any PlatformMSRHandler)?) { cpu.platformMSRs = handler }
    public func setInterruptController(_ controller: (any PlatformInterruptController)?) {
        interruptController = controller
        cpu.interruptController = controller
    }
    private(set) var interruptController: (any PlatformInterruptController)?

    public func setExternalInterruptController(_ controller: (any ExternalInterruptController)?) { externalController = controller }
    public func setExternalInterruptRequest(_ asserted: Bool) {
        externalRequest.store(asserted, ordering: .releasing)
        if asserted && idle.load(ordering: .sequentiallyConsistent) { idleWake.signal() }
    }

    /// Whether an injected vector or an ExtINT request waits.
    private var interruptWaits: Bool { !pending.isEmpty || externalRequest.load(ordering: .relaxed) }

    /// The next interrupt the guest may take now: an injected vector, else the vector an
    /// ExtINT request's acknowledge answers.
    private func takeInterrupt() -> UInt8? {
        if let v = takeInjectedInterrupt() { return v }
        guard externalRequest.load(ordering: .acquiring), let controller = externalController else { return nil }
        return controller.acknowledgeExternalInterrupt(vcpu: id)
    }

    /// The next injected vector the guest may take now (with a platform interrupt controller:
    /// above the processor priority, and acknowledged to it).
    private func takeInjectedInterrupt() -> UInt8? {
        guard let controller = interruptController else { return pending.takeHighest() }
        let threshold = controller.processorPriority(vcpu: id) & 0xF0
        guard let v = pending.takeHighest() else { return nil }
        if v & 0xF0 <= threshold {
            pending.post(v)  // masked by priority: stays requested
            return nil
        }
        controller.acknowledge(vcpu: id, vector: v)
        return v
    }
    public var timeStampCounter: UInt64 { cpu.instructions &+ cpu.tscOffset }

    /// Takes one pending NMI, leaving at most one latched behind it.
    private func takeNMI() -> Bool {
        var count = nmiPending.load(ordering: .relaxed)
        while count > 0 {
            let (exchanged, now) = nmiPending.compareExchange(expected: count, desired: min(count - 1, 1), ordering: .acquiringAndReleasing)
            if exchanged { return true }
            count = now
        }
        return false
    }

    /// Whether this vCPU runs translated code.
    public var usesTranslation: Bool { cpu.translator != nil }
    /// Blocks translated so far.
    public var blocksTranslated: UInt64 { cpu.translator?.blocksTranslated ?? 0 }
    /// Instruction attempts the interpreter made (all of them without translation).
    public var instructionsInterpreted: UInt64 { cpu.translator == nil ? cpu.instructions : cpu.interpretedUnderTranslation }

    /// Arms the preemption timer: `run()` returns `.preemptionTimer` after `instructions`
    /// more instruction attempts.
    public func armPreemptionTimer(instructions: UInt64) { preemptionBudget = instructions }
    public func disarmPreemptionTimer() { preemptionBudget = nil }

    /// Instructions retired so far.
    public var instructionsRetired: UInt64 { cpu.instructions }
    public var executionCounts: ExecutionCounts {
        ExecutionCounts(instructions: cpu.instructions, interpreted: instructionsInterpreted,
                        blocksTranslated: blocksTranslated, translating: usesTranslation)
    }
    /// Guest exceptions raised (including #UD for unsupported encodings) and software interrupts.
    public var exceptionCount: UInt64 { cpu.exceptionCount }
    /// #UD raised: undefined or unimplemented encodings.
    public var undefinedOpcodeCount: UInt64 { cpu.undefinedOpcodeCount }
    /// Instructions decoded (misses of the decoded-instruction cache).
    public var instructionsDecoded: UInt64 { cpu.decodes }
    /// Page walks done on TLB misses, and the page-table entries they read.
    public var pageWalks: (walks: UInt64, references: UInt64) { (cpu.pageWalks, cpu.pageWalkReferences) }
    /// TLB lookups (interpreted accesses and translator TLB misses); `pageWalks` of them missed.
    public var tlbLookups: UInt64 { cpu.tlbLookups }

    public func getState() throws -> VCPUState { cpu.save() }

    /// Loads registers. The VMM may have rewritten memory since the last run (a snapshot
    /// restore, a new image), so decoded instructions are dropped too.
    public func setState(_ state: VCPUState) throws {
        cpu.load(state)
        cpu.shadowRoot = 0  // shadow mode: the VMM picks the root for the new CR3
        cpu.pendingEvent = nil
        vm.codePages.invalidateAll()
    }

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
        } else if let last = cpu.lastMMIORead {
            let read = CPU.MMIOReadValue(address: last.address, size: last.size, value: value & CPU.mask(Int(last.size)))
            cpu.heldMMIOReads.append(read)
        }
        cpu.lastMMIORead = nil
    }

    public func completeHypercall(result: UInt64) { cpu.gpr[0] = result }

    public func requestExit() {
        exitRequested.store(true, ordering: .sequentiallyConsistent)
        if idle.load(ordering: .sequentiallyConsistent) { idleWake.signal() }
    }

    var exitIsRequested: Bool { exitRequested.load(ordering: .sequentiallyConsistent) }

    /// Queues an external interrupt, delivered through the IDT once RFLAGS.IF is set and no
    /// STI/MOV SS interrupt shadow is in force (as KVM_INTERRUPT); the highest vector
    /// first. `hlt` exits to the VMM (which resumes the vCPU once one is pending, as with KVM).
    /// A running vCPU sees it within one block. Vector 2 is the NMI: taken whatever IF
    /// says, and not again until the handler's IRET.
    public func injectInterrupt(vector: UInt8) {
        if vector == 2 {
            let limit = nmiMasked.load(ordering: .acquiring) ? 1 : 2
            var count = nmiPending.load(ordering: .relaxed)
            while count < limit {
                let (exchanged, now) = nmiPending.compareExchange(expected: count, desired: count + 1, ordering: .acquiringAndReleasing)
                if exchanged { break }
                count = now
            }
        } else {
            pending.post(vector)
        }
        if idle.load(ordering: .sequentiallyConsistent) { idleWake.signal() }
    }

    public var hasPendingInterrupt: Bool { interruptWaits || nmiPending.load(ordering: .acquiring) != 0 }

    public var interruptsEnabled: Bool { cpu.rflags & Flag.if != 0 }

    public func run() throws(VCPUError) -> VMExit {
        let cpu = self.cpu
        // A confidential VM's host memory is current whenever the VMM holds the vCPU.
        defer { if let c = cpu.confidential, c.writeBack() { cpu.flushTLB() } }
        let epoch = vm.secondLevel.epoch
        if cpu.secondLevelEpoch != epoch {  // INVEPT since the last run
            cpu.flushTLB()
            // Shadow mode: after a restricting change the shadow tables must be rebuilt; the
            // VMM learns of it at the shadow fault that a root of 0 causes.
            let restriction = vm.secondLevel.restrictionEpoch
            if cpu.shadowEntries != nil && restriction != cpu.secondLevelRestrictionSeen { cpu.shadowRoot = 0 }
            cpu.secondLevelRestrictionSeen = restriction
            cpu.secondLevelEpoch = epoch
        }
        let shadowSync = vm.shadowSync
        if cpu.shadowEntries != nil {
            shadowSync.slots[id].running.store(true, ordering: .sequentiallyConsistent)
            syncShadowFlush()
        }
        defer { if cpu.shadowEntries != nil { shadowSync.slots[id].running.store(false, ordering: .sequentiallyConsistent) } }
        if let e = cpu.pendingEvent {
            cpu.pendingEvent = nil
            if !cpu.raise(vector: e.vector, errorCode: e.errorCode, software: e.software, fault: e.fault, external: e.external, after: e.after) {
                return .shutdown
            }
        }
        while true {
            if cpu.attention, let e = takeExit() {
                // `hlt` with interrupts enabled and the platform timer armed: waits here (guest time).
                if case .halt = e, cpu.timerDeadline != .max, cpu.rflags & Flag.if != 0 { cpu.waitingForTimer = true; continue }
                return e
            }
            if exitRequested.load(ordering: .relaxed) && exitRequested.exchange(false, ordering: .acquiring) {
                return .interrupted
            }
            if cpu.timerDeadline != .max || cpu.waitingForTimer {
                if case .halt? = waitForTimer() { return .halt }
                if exitIsRequested { continue }
            }
            if cpu.shadowEntries != nil { syncShadowFlush() }
            // An instruction re-executed with its MMIO values completes before any event.
            let holdingReads = cpu.holdsMMIOReads
            if !cpu.nmiBlocked && nmiMasked.load(ordering: .relaxed) { nmiMasked.store(false, ordering: .releasing) }  // IRET
            if !holdingReads && !cpu.interruptShadow && !cpu.nmiBlocked && nmiPending.load(ordering: .relaxed) != 0
                && takeNMI() {
                cpu.nmiBlocked = true
                nmiMasked.store(true, ordering: .releasing)
                if !cpu.raise(vector: 2, errorCode: nil, software: false, fault: false) { return .shutdown }
                if cpu.attention { continue }
            }
            if !holdingReads && !cpu.interruptShadow && cpu.rflags & Flag.if != 0 && interruptWaits, let v = takeInterrupt() {
                if !cpu.raise(vector: v, errorCode: nil, software: false, fault: false) { return .shutdown }
                if cpu.attention { continue }  // delivery stopped at an EPT violation
            }
            var limit = Self.blockSize
            let shadowed = cpu.interruptShadow
            if shadowed || holdingReads { limit = 1 }  // look again right after the shadowed instruction
            if let budget = preemptionBudget {
                if budget == 0 { preemptionBudget = nil; return .preemptionTimer }
                limit = Int(min(UInt64(limit), budget))
            }
            if cpu.timerDeadline != .max { limit = Int(min(UInt64(limit), max(1, cpu.timerDeadline &- (cpu.instructions &+ cpu.tscOffset)))) }
            cpu.attention = false
            let used: Int
            if cpu.inLegacyMode {
                used = cpu.runLegacy(limit)  // boot code outside 64-bit mode: interpreted
            } else if let t = cpu.translator, !cpu.codeBreakpointsArmed {
                if limit >= 16 {
                    used = cpu.runTranslated(t, limit: limit)
                } else {
                    used = cpu.runBlock(limit)  // a shadowed instruction or the timer's last few
                    cpu.interpretedUnderTranslation &+= UInt64(used)
                }
            } else {
                used = cpu.runBlock(limit)
            }
            if shadowed { cpu.interruptShadow = false }
            // Done with the values unless the instruction stopped at a further MMIO read.
            if holdingReads && cpu.lastMMIORead == nil { cpu.dropHeldMMIOReads() }
            if let budget = preemptionBudget { preemptionBudget = budget &- UInt64(used) }
        }
    }

    /// Shadow mode: honours a VM-wide TLB flush (`ShadowFlushSync`) at a block boundary.
    @inline(__always)
    private func syncShadowFlush() {
        let sync = vm.shadowSync
        let g = sync.generation.load(ordering: .sequentiallyConsistent)
        if g != cpu.shadowFlushSeen {
            cpu.flushTLB()
            cpu.shadowFlushSeen = g
            sync.slots[id].seen.store(g, ordering: .releasing)
        }
    }

    /// The exit the last instruction left, if any (an MMIO write is reported first; another
    /// exit of the same instruction stays pending for the next `run()`).
    private func takeExit() -> VMExit? {
        if let w = cpu.pendingMMIOWrite {
            cpu.pendingMMIOWrite = cpu.moreMMIOWrites.isEmpty ? nil : cpu.moreMMIOWrites.removeFirst()
            cpu.attention = cpu.pendingExit != nil || cpu.pendingMMIOWrite != nil
            return .mmio(w)
        }
        cpu.attention = false
        guard let e = cpu.pendingExit else { return nil }
        cpu.pendingExit = nil
        // HLT exits even when an interrupt is already waiting, as on KVM with the interrupt
        // controller in the VMM: the VMM sees it pending and the next run() delivers it.
        return e
    }
}

extension CPU {
    /// Runs up to `limit` instruction attempts, stopping early when an instruction sets
    /// `attention`. Returns the attempts made.
    func runBlock(_ limit: Int) -> Int {
        var left = limit
        while left > 0 {
            left &-= 1
            do throws(Fault) {
                if codeBreakpointsArmed { try checkCodeBreakpoints() }
                let p = try fetchDecoded()
                if let lock = atomicLock, p.pointee.pfx & Instr.P.lock != 0 || (p.pointee.op & 0x1FE == 0x86 && p.pointee.isMem) {
                    try executeLocked(p.pointee, lock)
                } else {
                    try execute(p.pointee)
                }
            } catch {
                handle(error)
            }
            if attention { break }
        }
        return limit - left
    }

    /// The current instruction's memory operand is addressed through SS: based on RSP or
    /// RBP without a segment override.
    private func memoryOperandOnStackSegment() -> Bool {
        guard let p = try? fetchDecoded() else { return false }
        let i = p.pointee
        return i.isMem && (i.base == 4 || i.base == 5) && i.seg == 0
    }

    /// A fault of the current instruction: exits for MMIO reads and fetches outside RAM,
    /// guest exceptions otherwise (triple fault: `.shutdown`).
    func handle(_ f: Fault) {
        pendingMMIOWrite = nil
        if !moreMMIOWrites.isEmpty { moreMMIOWrites.removeAll(keepingCapacity: true) }
        switch f {
        case let .mmioRead(address, size):
            lastMMIORead = (address, size)
            exit(.mmio(MMIOAccess(address: address, size: size, direction: .read)))
        case .exception(var vector, let code):
            if nonCanonicalAccess {
                nonCanonicalAccess = false
                if vector == 13 && memoryOperandOnStackSegment() { vector = 12 }  // #SS(0) (SDM Vol. 3A §6.15)
            }
            exceptionCount &+= 1
            if vector == 6 { undefinedOpcodeCount &+= 1 }
            if !raise(vector: vector, errorCode: code, software: false, fault: true) { exit(.shutdown) }
        case let .softwareInterrupt(vector, checkDPL, length):
            exceptionCount &+= 1
            if !raise(vector: vector, errorCode: nil, software: checkDPL, fault: false, external: false,
                      instructionStart: rip &- UInt64(length)) { exit(.shutdown) }
        case let .secondLevelViolation(gpa, access):
            exit(.memoryFault(gpa: gpa, access: MemoryAccessKind(rawValue: access)))
        case let .shadowFault(linear, code):
            exit(.shadowPaging(.pageFault(linear: linear, errorCode: code)))
        case let .fetchOutsideRAM(gpa):
            // KVM_INTERNAL_ERROR_EMULATION, as KVM reports code fetched from MMIO.
            exit(.internalError(suberror: 1, data: [gpa, rip], instructionBytes: []))
        }
    }
}
