import Synchronization
import VirtCore
#if canImport(Glibc)
import Glibc
#endif

/// Shadow mode of the software engine: the CPU walks only the VMM's shadow tables
/// (`ShadowPageTablePool`); whatever they lack or forbid exits to the VMM, which walks the
/// guest's tables itself. CR3/CR0/CR4/EFER writes and INVLPG exit too.
extension CPU {
    /// The shadow walk behind `translate` in shadow mode: four levels of the VMM's table,
    /// the same permission checks as the guest walk (the shadow entries carry the guest's
    /// U/W/NX bits), and a TLB fill. No guest-table access, no A/D update, no CR2 write.
    func shadowWalk(_ linear: UInt64, write: Bool, execute: Bool, user: Bool, _ entries: UnsafeMutablePointer<UInt64>) throws(Fault) -> UInt64 {
        typealias P = ShadowPageTablePool
        var table = shadowRoot
        guard table != 0 else { throw shadowFault(linear, present: false, write: write, execute: execute, user: user) }
        var writable = true, userOK = true, noExecute = false
        var level = 3
        var entry: UInt64
        while true {
            entry = entries[table &* 512 &+ Int((linear >> UInt64(12 + 9 * level)) & 0x1FF)]
            guard entry & P.present != 0 else { throw shadowFault(linear, present: false, write: write, execute: execute, user: user) }
            writable = writable && entry & P.writable != 0
            userOK = userOK && entry & P.user != 0
            noExecute = noExecute || entry & P.noExecute != 0
            if level == 0 { break }
            table = Int((entry & P.frameMask) >> 12)
            level -= 1
        }
        let host = entry & P.frameMask
        let trapped = entry & P.writeTrap != 0
        let denied = (user && !userOK)
            || (write && !writable && (user || cr0 & CR.wp != 0))
            || (execute && noExecute)
            || (!user && userOK && !supervisorMayUseUserPage(execute: execute))
            || (write && trapped && host != trapBypassFrame)
        if denied { throw shadowFault(linear, present: true, write: write, execute: execute, user: user) }
        // Counted when complete: a walk that faults is the VMM's (a shadow fill or a guest
        // #PF), and the engine's own retries of it are not the hardware's.
        pageWalks &+= 1
        pageWalkReferences &+= 4
        // The emulated write is never cached, nor is MMIO (the leaf holds the guest-physical address).
        if (write && trapped) || host >= ramSize { return host | (linear & 0xFFF) }
        let page = linear >> 12
        let slot = Int(page & UInt64(Self.tlbSize - 1))
        tlbTags[slot] = page &+ 1
        tlbFrames[slot] = host
        tlbBits[slot] = (writable && !trapped ? TLBBits.writeOK : 0) | (userOK ? TLBBits.user : 0) | (noExecute ? TLBBits.noExecute : 0)
        return host | (linear & 0xFFF)
    }

    func shadowFault(_ linear: UInt64, present: Bool, write: Bool, execute: Bool, user: Bool) -> Fault {
        var code: UInt32 = present ? 1 : 0
        if write { code |= 2 }
        if user { code |= 4 }
        if execute { code |= 0x10 }
        if implicitSupervisorAccess { code |= ShadowPagingEvent.implicitAccess }
        return .shadowFault(linear: linear, errorCode: code)
    }

    /// After a write to CR0, CR3, CR4 or EFER in shadow mode: the shadow root no longer
    /// matches the guest's paging state, so the vCPU walks nothing until the VMM says.
    func shadowContextChanged() {
        guard shadowEntries != nil else { return }
        shadowRoot = 0
        exit(.shadowPaging(.contextSwitch(cr3: cr3)))
    }

    /// INVLPG in shadow mode: reported once the instruction has run.
    func shadowPageInvalidated(_ linear: UInt64) {
        guard shadowEntries != nil else { return }
        exit(.shadowPaging(.invalidatePage(linear: linear)))
    }
}

/// A VM-wide TLB shootdown for shadow mode: `flush()` bumps a generation and waits until
/// every vCPU inside `run()` has flushed its TLB at a block boundary (one outside `run()`
/// flushes when it enters).
final class ShadowFlushSync: Sendable {
    let generation = Atomic<UInt64>(0)
    /// Per vCPU: inside `run()`, and the generation its TLB is current with.
    final class Slot: Sendable {
        let running = Atomic<Bool>(false)
        let seen = Atomic<UInt64>(0)
    }
    let slots: [Slot]

    init(vcpuCount: Int) { slots = (0..<vcpuCount).map { _ in Slot() } }

    func flush() {
        let target = generation.add(1, ordering: .sequentiallyConsistent).newValue
        for s in slots {
            while s.running.load(ordering: .sequentiallyConsistent) && s.seen.load(ordering: .acquiring) < target {
                sched_yield()
            }
        }
    }
}

extension SoftwareVirtualMachine: ShadowPagingVM, SecondLevelPageSizing {
    public func lookUpSecondLevel(_ gpa: UInt64, access: MemoryAccessKind, userAddress: Bool) -> SecondLevelLookup {
        guard gpa < memory.size else { return .notRAM }
        let page = Int(gpa >> 12)
        let sl = secondLevel
        let p = sl.permissions[page]
        let executeBit = sl.executeBit(userAddress: userAddress)
        let need: UInt8 = access.contains(.write) ? 2 : access.contains(.execute) ? executeBit : 1
        if p & need == 0 { return .violation(gpa: gpa, access: access) }
        if sl.accessed[page] == 0 { sl.accessed[page] = 1 }
        if access.contains(.write) && sl.dirty[page] == 0 { sl.dirty[page] = 1 }
        return .host(offset: sl.hostAddress(gpa) & ~0xFFF, writable: p & 2 != 0 && sl.dirty[page] != 0,
                     executable: p & executeBit != 0)
    }

    public var secondLevelGeneration: UInt64 { secondLevel.restrictionEpoch }

    public func hostOffset(of gpa: UInt64) -> UInt64? { gpa < memory.size ? secondLevel.hostAddress(gpa) : nil }

    public func flushShadowTranslations() { shadowSync.flush() }

    public var secondLevelLargestPage: SecondLevelPageSize {
        get { secondLevel.largestPage }
        set { secondLevel.largestPage = newValue }
    }
}

extension SoftwareVirtualCPU: ShadowPagingVCPU {
    public func enableShadowPaging(_ pool: ShadowPageTablePool) {
        precondition(id < vm.config.vcpuCount, "vCPU \(id) beyond the VM's vCPU count")
        vm.shadowPools.withLock { $0.append(pool) }  // keeps the pool alive as long as the VM
        cpu.shadowEntries = pool.entries
        cpu.shadowRoot = 0
        cpu.flushTLB()
    }

    public var shadowRoot: Int {
        get { cpu.shadowRoot }
        set {
            cpu.shadowRoot = newValue
            cpu.flushTLB()
        }
    }

    public var pagingContext: GuestPagingContext {
        GuestPagingContext(cr0: cpu.cr0, cr3: cpu.cr3, cr4: cpu.cr4, efer: cpu.efer, rflags: cpu.rflags)
    }

    public var isUserMode: Bool { cpu.cpl == 3 }

    public func injectPageFault(address: UInt64, errorCode: UInt32) {
        cpu.cr2 = address
        let interrupted = cpu.pendingEvent
        if interrupted == nil { cpu.exceptionCount &+= 1 }  // as `handle` counts a faulting instruction
        cpu.pendingEvent = CPU.PendingEvent(vector: 14, errorCode: errorCode, software: false, fault: true,
                                            external: interrupted?.external ?? true, after: interrupted?.vector)
    }

    public func emulateTrappedWrite(frame: UInt64) {
        let c = cpu
        c.trapBypassFrame = frame
        defer { c.trapBypassFrame = ~0 }
        if let e = c.pendingEvent {
            // The trapped write was an event delivery's (its frame pushed onto a page table).
            c.pendingEvent = nil
            if !c.raise(vector: e.vector, errorCode: e.errorCode, software: e.software, fault: e.fault, external: e.external, after: e.after) {
                c.exit(.shutdown)
            }
            return
        }
        c.attention = false
        let attempts = c.runBlock(1)
        if c.translator != nil { c.interpretedUnderTranslation &+= UInt64(attempts) }
    }
}

extension SoftwareVirtualMachine: ModeBasedExecuteControl {
    /// Change while no vCPU runs (it alters what cached translations allow).
    public var modeBasedExecute: Bool {
        get { secondLevel.modeBasedExecute }
        set {
            secondLevel.modeBasedExecute = newValue
            secondLevel.modeChanged()
        }
    }
}

extension SoftwareVirtualCPU: SecondLevelViolationReporting {
    public var lastSecondLevelViolation: SecondLevelViolation? { cpu.lastViolation }
}

extension SoftwareVirtualCPU: PageWalkCounting {
    public var pageWalkCounts: PageWalkCounts {
        PageWalkCounts(tlbLookups: cpu.tlbLookups, walks: cpu.pageWalks, references: cpu.pageWalkReferences)
    }
}
