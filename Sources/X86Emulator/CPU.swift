import Synchronization
import VirtCore

/// Serialises LOCK-prefixed instructions (and XCHG with memory) across a VM's vCPU
/// threads, so guest atomics stay atomic when several interpreters share RAM.
final class AtomicInstructionLock: Sendable {
    let mutex = Mutex(())
}

/// One generation counter per 4 KiB page of guest RAM, shared by a VM's vCPUs. Bit 31 says
/// "some vCPU has decoded instructions on this page": a write to such a page bumps the
/// generation (and clears the bit), which invalidates every cached decode of the page.
///
/// Several vCPU threads read and update the counters, so each is an `Atomic` (relaxed: on
/// x86 a plain load or store, plus a compare-exchange on the rare update). Translated code
/// reads them through the raw address, which has the layout of `UInt32`.
// SAFETY: the buffer is allocated once and freed in deinit; every Swift access is atomic.
final class CodePages: @unchecked Sendable {
    typealias Generations = UnsafeMutablePointer<Atomic<UInt32>>
    static let hasCode: UInt32 = 0x8000_0000
    let gens: Generations
    let count: Int

    init(ramSize: UInt64) {
        count = Int((ramSize + 0xFFF) >> 12)
        gens = .allocate(capacity: max(count, 1))
        for p in 0..<max(count, 1) { (gens + p).initialize(to: Atomic(0)) }
    }

    deinit {
        gens.deinitialize(count: max(count, 1))
        gens.deallocate()
    }

    /// Forgets every decoded instruction (after the VMM rewrote guest memory).
    func invalidateAll() {
        for p in 0..<count { Self.bump(gens, p) }
    }

    func invalidate(gpa: UInt64, length: UInt64) {
        guard length > 0 else { return }
        let first = Int(min(gpa >> 12, UInt64(count)))
        let last = Int(min((gpa &+ length &- 1) >> 12, UInt64(count &- 1)))
        guard first <= last else { return }
        for p in first...last { Self.bump(gens, p) }
    }

    /// The page's generation (without the has-code bit).
    @inline(__always)
    static func generation(_ gens: Generations, _ page: Int) -> UInt32 { gens[page].load(ordering: .relaxed) & ~hasCode }

    @inline(__always)
    static func hasCode(_ gens: Generations, _ page: Int) -> Bool { gens[page].load(ordering: .relaxed) & hasCode != 0 }

    /// A guest store to `page`: if code was decoded from it, a new generation invalidates that.
    @inline(__always)
    static func noteWrite(_ gens: Generations, _ page: Int) {
        let g = gens[page].load(ordering: .relaxed)
        // A failed exchange means another thread bumped it (or marked and bumped) first.
        if g & hasCode != 0 { _ = gens[page].compareExchange(expected: g, desired: (g &+ 1) & ~hasCode, ordering: .relaxed) }
    }

    /// Code is being cached from `page`: sets the has-code bit. Returns the generation the
    /// cache entry must carry and whether the bit was newly set (cached write permissions
    /// for the page must then be dropped).
    @inline(__always)
    static func markCode(_ gens: Generations, _ page: Int) -> (generation: UInt32, newlyMarked: Bool) {
        var g = gens[page].load(ordering: .relaxed)
        while g & hasCode == 0 {
            let (exchanged, original) = gens[page].compareExchange(expected: g, desired: g | hasCode, ordering: .relaxed)
            if exchanged { return (g, true) }
            g = original
        }
        return (g & ~hasCode, false)
    }

    private static func bump(_ gens: Generations, _ page: Int) {
        var g = gens[page].load(ordering: .relaxed)
        while true {
            let (exchanged, original) = gens[page].compareExchange(expected: g, desired: (g &+ 1) & ~hasCode, ordering: .relaxed)
            if exchanged { return }
            g = original
        }
    }
}

/// RFLAGS bits.
enum Flag {
    static let cf: UInt64 = 1 << 0, pf: UInt64 = 1 << 2, af: UInt64 = 1 << 4, zf: UInt64 = 1 << 6
    static let sf: UInt64 = 1 << 7, tf: UInt64 = 1 << 8, `if`: UInt64 = 1 << 9, df: UInt64 = 1 << 10
    static let of: UInt64 = 1 << 11, iopl: UInt64 = 3 << 12, nt: UInt64 = 1 << 14, rf: UInt64 = 1 << 16
    static let vm: UInt64 = 1 << 17, ac: UInt64 = 1 << 18, id: UInt64 = 1 << 21
    static let arithmetic: UInt64 = cf | pf | af | zf | sf | of
}

/// Control-register bits the engine looks at.
enum CR {
    static let pe: UInt64 = 1, ts: UInt64 = 8, et: UInt64 = 0x10, wp: UInt64 = 1 << 16, pg: UInt64 = 1 << 31
    static let cr0Valid: UInt64 = 0xE005_003F
    static let tsd: UInt64 = 1 << 2, de: UInt64 = 1 << 3, pae: UInt64 = 1 << 5, umip: UInt64 = 1 << 11, fsgsbase: UInt64 = 1 << 16
    static let smep: UInt64 = 1 << 20, smap: UInt64 = 1 << 21
    /// VME PVI TSD DE PSE PAE MCE PGE PCE OSFXSR OSXMMEXCPT UMIP FSGSBASE OSXSAVE SMEP SMAP.
    static let cr4Valid: UInt64 = 0x7FF | umip | fsgsbase | 1 << 18 | smep | smap
    static let eferSCE: UInt64 = 1, eferLME: UInt64 = 1 << 8, eferLMA: UInt64 = 1 << 10, eferNXE: UInt64 = 1 << 11
}

/// The architectural state of the software CPU and its view of guest memory. Registers
/// live in one unsafe buffer so the interpreter loop does no ARC or bounds-check work on
/// them. Owned by one vCPU thread.
///
/// Its stored state is `@exclusivity(unchecked)`: the dynamic exclusivity checks
/// (`swift_beginAccess`) of class properties cost about a quarter of a Linux boot.
// SAFETY: one vCPU thread owns a CPU, and no access to a property overlaps another access
// to it (none is passed inout to code that reaches it again through the CPU).
final class CPU {
    /// Physical address width reported by CPUID 0x80000008; page-table bits above it are reserved.
    static let maxPhysicalAddressBits: UInt64 = 40
    static let physicalAddressMask: UInt64 = ((1 << maxPhysicalAddressBits) - 1) & ~0xFFF

    /// The context block shared with translated code (`TranslatorContext`); the GPRs are
    /// its first 128 bytes.
    let context: UnsafeMutableRawPointer
    let gpr: UnsafeMutablePointer<UInt64>
    /// The block translator (nil: interpret everything).
    @exclusivity(unchecked) var translator: BlockTranslator?
    /// The translator's TLB and jump cache must be emptied before translated code runs again.
    @exclusivity(unchecked) var translatorFlushPending = true
    /// What to empty at the next flush.
    // SAFETY: unchecked exclusivity: only this vCPU's thread fills and flushes.
    @exclusivity(unchecked) var translatorFills = TranslatorFillLog()
    @exclusivity(unchecked) var lastTranslatorKey: UInt64 = ~0
    /// Instruction attempts handed to the interpreter while translation is on.
    @exclusivity(unchecked) var interpretedUnderTranslation: UInt64 = 0
    @exclusivity(unchecked) var rip: UInt64 = 0
    @exclusivity(unchecked) var rflags: UInt64 = 0x2
    @exclusivity(unchecked) var cs = SegmentRegister(), ss = SegmentRegister(), ds = SegmentRegister(), es = SegmentRegister()
    @exclusivity(unchecked) var fs = SegmentRegister(), gs = SegmentRegister(), tr = SegmentRegister(), ldtr = SegmentRegister()
    @exclusivity(unchecked) var gdt = DescriptorTableRegister(), idt = DescriptorTableRegister()
    @exclusivity(unchecked) var cr0: UInt64 = 0x6000_0010, cr2: UInt64 = 0, cr3: UInt64 = 0, cr4: UInt64 = 0, cr8: UInt64 = 0
    @exclusivity(unchecked) var efer: UInt64 = 0
    var apicBase: UInt64 = 0xFEE0_0900
    @exclusivity(unchecked) var star: UInt64 = 0, lstar: UInt64 = 0, cstar: UInt64 = 0, fmask: UInt64 = 0, pat: UInt64 = 0x0007_0406_0007_0406
    @exclusivity(unchecked) var sysenterCS: UInt64 = 0, sysenterESP: UInt64 = 0, sysenterEIP: UInt64 = 0, tscAux: UInt64 = 0
    @exclusivity(unchecked) var kernelGSBase: UInt64 = 0
    @exclusivity(unchecked) var tscOffset: UInt64 = 0
    /// The platform timer's deadline in TSC ticks (`.max`: none), and whether a `hlt` waits
    /// for it (GuestTimer.swift).
    @exclusivity(unchecked) var timerDeadline: UInt64 = .max
    @exclusivity(unchecked) var waitingForTimer = false
    /// The #GP being raised is a non-canonical data address.
    @exclusivity(unchecked) var nonCanonicalAccess = false
    /// PAUSE instructions executed (SpinWait.swift).
    @exclusivity(unchecked) var pauses: UInt64 = 0
    /// x87 and SSE registers (SSE/FloatingPointState.swift).
    @exclusivity(unchecked) var fp = FloatingPointState()
    /// Set by STI (when it enables IF) and MOV SS/POP SS: no interrupt is taken before the
    /// next instruction completes.
    @exclusivity(unchecked) var interruptShadow = false
    /// An NMI handler runs: further NMIs wait until the next IRET (SDM Vol. 3A §6.7.1).
    @exclusivity(unchecked) var nmiBlocked = false
    /// Instructions retired (the TSC and the preemption timer count these).
    @exclusivity(unchecked) var instructions: UInt64 = 0
    /// Guest exceptions raised, and how many of them were #UD.
    @exclusivity(unchecked) var exceptionCount: UInt64 = 0
    @exclusivity(unchecked) var undefinedOpcodeCount: UInt64 = 0

    /// The run loop must look at the CPU after this instruction: an exit is pending, an
    /// interrupt shadow started, or IF was set.
    @exclusivity(unchecked) var attention = false
    /// The exit the current instruction produced (with `attention`).
    @exclusivity(unchecked) var pendingExit: VMExit?

    let ram: UnsafeMutableRawPointer
    let ramSize: UInt64
    /// A confidential VM's memory path (nil: ordinary VM); `ram` is then its view.
    let confidential: ConfidentialMemory?
    /// PVALIDATE's own walk (no reverse-map check) and the guest page it reached.
    @exclusivity(unchecked) var pvalidateWalk = false
    @exclusivity(unchecked) var pvalidateGuestPage: UInt64 = 0
    let codePages: CodePages
    let codeGens: CodePages.Generations
    /// The VM's second-level page table (EPT model) and the INVEPT epoch this vCPU's TLB
    /// was filled under.
    let secondLevel: SecondLevelPageTable
    @exclusivity(unchecked) var secondLevelEpoch: UInt64 = 0

    /// The last second-level violation's qualification (read by the VMM after the exit).
    @exclusivity(unchecked) var lastViolation: SecondLevelViolation?

    /// Values the VMM supplied for the MMIO reads of the instruction being re-executed (several
    /// for CMPS between MMIO operands or a read crossing MMIO pages, one exit each); kept until that instruction
    /// completes (the run loop then runs it alone, before any interrupt), so each device
    /// read happens once.
    struct MMIOReadValue { var address: UInt64; var size: UInt8; var value: UInt64 }
    @exclusivity(unchecked) var heldMMIOReads: [MMIOReadValue] = []
    var holdsMMIOReads: Bool { !heldMMIOReads.isEmpty }
    func dropHeldMMIOReads() { heldMMIOReads.removeAll(keepingCapacity: true) }
    /// The MMIO read reported by the last exit (so `completeRead` can answer it).
    @exclusivity(unchecked) var lastMMIORead: (address: UInt64, size: UInt8)?
    /// An MMIO write made by the current instruction, reported once it completes.
    @exclusivity(unchecked) var pendingMMIOWrite: MMIOAccess?
    /// Further MMIO writes of the same instruction (a 16-byte SSE store, a store crossing
    /// into a second MMIO page), reported one exit each after `pendingMMIOWrite`.
    @exclusivity(unchecked) var moreMMIOWrites: [MMIOAccess] = []
    /// DR0–DR3, DR6, DR7; `codeBreakpointsArmed`: DR7 enables an instruction breakpoint.
    @exclusivity(unchecked) var debugAddress: (UInt64, UInt64, UInt64, UInt64) = (0, 0, 0, 0)
    @exclusivity(unchecked) var dr6: UInt64 = 0xFFFF_0FF0, dr7: UInt64 = 0x400
    @exclusivity(unchecked) var codeBreakpointsArmed = false
    /// Size of the `in` whose value `completeRead` will put in RAX (0: none).
    @exclusivity(unchecked) var pendingInSize = 0
    /// An `ins` element the VMM supplied; the re-executed `ins` stores it at [RDI].
    @exclusivity(unchecked) var pendingInsValue: UInt64?
    /// Set while an `ins` waits for its value (so `completeRead` knows where it goes).
    @exclusivity(unchecked) var awaitingInsValue = false

    /// An event whose delivery was stopped by an EPT violation, delivered again first
    /// thing in the next `run()`.
    /// `after`: the vector whose delivery raised this one (shadow mode: a #PF the VMM
    /// found while an event was being delivered), for the double-fault rules.
    struct PendingEvent {
        var vector: UInt8; var errorCode: UInt32?; var software, fault, external: Bool; var after: UInt8? = nil
    }
    @exclusivity(unchecked) var pendingEvent: PendingEvent?

    /// The VMM's local APIC registers, reached through RDMSR/WRMSR (nil: #GP), and this
    /// vCPU's index for it.
    var platformMSRs: (any PlatformMSRHandler)?
    /// The VMM's local APIC, which holds CR8 (as TPR[7:4]) when there is one.
    var interruptController: (any PlatformInterruptController)?
    var vcpuIndex = 0

    /// nil with one vCPU: nothing to serialise against.
    let atomicLock: AtomicInstructionLock?
    /// The locked instruction being executed, if any (AtomicExecution.swift).
    @exclusivity(unchecked) var lockedAccess = LockedAccess()

    /// A direct-mapped TLB of 4 KiB translations: tag = linear page + 1 (0 = empty), the
    /// guest-physical frame, and what the cached walk allows (see `TLBBits`).
    static let tlbSize = 1024
    let tlbTags: UnsafeMutablePointer<UInt64>
    let tlbFrames: UnsafeMutablePointer<UInt64>
    let tlbBits: UnsafeMutablePointer<UInt8>
    /// Some entry came from a 2 MiB or 1 GiB page (INVLPG must then drop them all).
    @exclusivity(unchecked) var tlbHasLargePages = false
    /// Counters of page walks and their memory references (for the lab's reports); TLB
    /// lookups made by `translate` (the interpreter's accesses and the translator's misses).
    @exclusivity(unchecked) var pageWalks: UInt64 = 0
    @exclusivity(unchecked) var pageWalkReferences: UInt64 = 0
    @exclusivity(unchecked) var tlbLookups: UInt64 = 0
    /// Set while the CPU makes an implicit supervisor-mode access (SMAP ignores RFLAGS.AC).
    @exclusivity(unchecked) var implicitSupervisorAccess = false

    /// Shadow mode (nil: nested): the VMM's shadow tables, the root this vCPU walks (a pool
    /// page, 0 for none), and the host frame one emulated write may reach despite its trap.
    @exclusivity(unchecked) var shadowEntries: UnsafeMutablePointer<UInt64>?
    @exclusivity(unchecked) var shadowRoot = 0
    @exclusivity(unchecked) var trapBypassFrame: UInt64 = ~0
    /// The VM's shadow-flush generation this vCPU's TLB is current with, and the second
    /// level's restriction epoch its shadow root was checked against.
    @exclusivity(unchecked) var shadowFlushSeen: UInt64 = 0
    @exclusivity(unchecked) var secondLevelRestrictionSeen: UInt64 = 0

    enum TLBBits {
        /// Writable, and the leaf's dirty bit is already set (so a write needs no walk).
        static let writeOK: UInt8 = 1
        static let user: UInt8 = 2
        static let noExecute: UInt8 = 4
    }

    /// Second-level check of a translation being cached: the EPT violation if `gpa`'s
    /// page forbids the access; otherwise sets its accessed (and for a write, dirty) flag.
    /// `userAddress`: the guest maps the page user-accessible (MBEC's execute bit choice);
    /// `linear`: the guest-linear address of the access, for the violation's qualification.
    @inline(__always)
    func secondLevelAccess(_ gpa: UInt64, write: Bool, execute: Bool, userAddress: Bool = false, linear: UInt64? = nil) throws(Fault) {
        let page = Int(gpa >> 12)
        let sl = secondLevel
        if sl.restrictedPages != 0 {
            let need: UInt8 = write ? 2 : execute ? sl.executeBit(userAddress: userAddress) : 1
            if sl.permissions[page] & need == 0 {
                lastViolation = SecondLevelViolation(gpa: gpa, linear: linear, access: MemoryAccessKind(rawValue: write ? 2 : execute ? 4 : 1),
                                                     allowed: PagePermissions(rawValue: sl.permissions[page]),
                                                     userAddress: userAddress, modeBasedExecute: sl.modeBasedExecute)
                throw .secondLevelViolation(gpa: gpa, access: write ? 2 : execute ? 4 : 1)
            }
        }
        if sl.accessed[page] == 0 { sl.accessed[page] = 1 }
        if write && sl.dirty[page] == 0 { sl.dirty[page] = 1 }
    }

    /// The code page the last instruction came from: tag (linear page << 2 | CPL) and
    /// guest-physical frame. Cleared with the TLB.
    @exclusivity(unchecked) var fetchTag: UInt64 = ~0
    @exclusivity(unchecked) var fetchFrame: UInt64 = 0

    /// Decoded-instruction cache, direct-mapped and keyed by guest-physical address.
    static let icacheBits = 14
    let icache: UnsafeMutablePointer<Instr>
    @exclusivity(unchecked) var decodes: UInt64 = 0

    init(memory: GuestMemory, codePages: CodePages, secondLevel: SecondLevelPageTable, atomicLock: AtomicInstructionLock?,
         confidential: ConfidentialMemory? = nil) {
        self.atomicLock = atomicLock
        self.confidential = confidential
        self.secondLevel = secondLevel
        self.codePages = codePages
        codeGens = codePages.gens
        tlbTags = .allocate(capacity: Self.tlbSize)
        tlbTags.initialize(repeating: 0, count: Self.tlbSize)
        tlbFrames = .allocate(capacity: Self.tlbSize)
        tlbFrames.initialize(repeating: 0, count: Self.tlbSize)
        tlbBits = .allocate(capacity: Self.tlbSize)
        tlbBits.initialize(repeating: 0, count: Self.tlbSize)
        icache = .allocate(capacity: 1 << Self.icacheBits)
        heldMMIOReads.reserveCapacity(16)  // an 8-byte read split into bytes, twice over
        moreMMIOWrites.reserveCapacity(16)
        icache.initialize(repeating: Instr(), count: 1 << Self.icacheBits)
        context = .allocate(byteCount: TranslatorContext.size, alignment: 64)
        context.initializeMemory(as: UInt8.self, repeating: 0, count: TranslatorContext.size)
        gpr = context.bindMemory(to: UInt64.self, capacity: 16)
        ram = confidential?.view ?? memory.base
        ramSize = memory.size
        context.storeBytes(of: UInt64(UInt(bitPattern: codePages.gens)), toByteOffset: Int(TranslatorContext.codeGens), as: UInt64.self)
        context.storeBytes(of: 0x3FF000, toByteOffset: Int(TranslatorContext.tlbIndexMask), as: UInt64.self)
        context.storeBytes(of: ~0xFFF, toByteOffset: Int(TranslatorContext.pageNumberMask), as: UInt64.self)
        context.storeBytes(of: UInt64(CodePages.hasCode), toByteOffset: Int(TranslatorContext.hasCodeMask), as: UInt64.self)
        context.storeBytes(of: BlockTranslator.missHelperAddress, toByteOffset: Int(TranslatorContext.missHelper), as: UInt64.self)
        context.storeBytes(of: UInt64(UInt(bitPattern: Unmanaged.passUnretained(self).toOpaque())),
                           toByteOffset: Int(TranslatorContext.owner), as: UInt64.self)
    }

    deinit {
        context.deallocate()
        translatorFills.deallocate()
        tlbTags.deallocate()
        tlbFrames.deallocate()
        tlbBits.deallocate()
        icache.deallocate()
        fp.deallocate()
    }

    /// Drops every cached translation (CR0/CR3/CR4/EFER writes, state loads).
    func flushTLB() {
        tlbTags.update(repeating: 0, count: Self.tlbSize)
        tlbHasLargePages = false
        fetchTag = ~0
        translatorFlushPending = true
    }

    /// INVLPG: the page's entry, or everything when large pages are cached.
    func invalidatePage(_ linear: UInt64) {
        if tlbHasLargePages { flushTLB(); return }
        let page = linear >> 12
        let slot = Int(page & UInt64(Self.tlbSize - 1))
        if tlbTags[slot] == page &+ 1 { tlbTags[slot] = 0 }
        fetchTag = ~0
        translatorFlushPending = true
    }

    var cpl: UInt8 { cs.dpl }

    @inline(__always)
    static func isCanonical(_ a: UInt64) -> Bool { UInt64(bitPattern: Int64(bitPattern: a << 16) >> 16) == a }

    // MARK: Linear → physical

    /// Translates a linear address through the guest's 4-level page tables, checking
    /// present, writable (CR0.WP at CPL0), user, NX, SMEP and SMAP, and setting
    /// accessed/dirty bits.
    @inline(__always)
    func translate(_ linear: UInt64, write: Bool, execute: Bool = false, user: Bool) throws(Fault) -> UInt64 {
        let page = linear >> 12
        let slot = Int(page & UInt64(Self.tlbSize - 1))
        tlbLookups &+= 1
        if tlbTags[slot] == page &+ 1 {
            let bits = tlbBits[slot]
            let userPage = bits & TLBBits.user != 0
            if (!write || bits & TLBBits.writeOK != 0) && (!user || userPage) && (!execute || bits & TLBBits.noExecute == 0)
                && (user || !userPage || supervisorMayUseUserPage(execute: execute)) {
                return tlbFrames[slot] | (linear & 0xFFF)
            }
        }
        return try walk(linear, write: write, execute: execute, user: user)
    }

    /// SMEP and SMAP, for a supervisor access to a user page. RFLAGS.AC lifts SMAP for
    /// explicit accesses only, not for the CPU's own descriptor-table and TSS accesses.
    @inline(__always)
    func supervisorMayUseUserPage(execute: Bool) -> Bool {
        execute ? cr4 & CR.smep == 0 : (cr4 & CR.smap == 0 || (rflags & Flag.ac != 0 && !implicitSupervisorAccess))
    }

    /// An implicit supervisor-mode access (GDT, LDT, IDT, TSS), whatever the CPL.
    func readSystem(_ linear: UInt64, size: Int) throws(Fault) -> UInt64 {
        implicitSupervisorAccess = true
        defer { implicitSupervisorAccess = false }
        return try read(linear, size: size, user: false)
    }

    func writeSystem(_ linear: UInt64, _ value: UInt64, size: Int) throws(Fault) {
        implicitSupervisorAccess = true
        defer { implicitSupervisorAccess = false }
        try write(linear, value, size: size, user: false)
    }

    /// The page walk behind `translate`; fills the TLB on success.
    func walk(_ linear: UInt64, write: Bool, execute: Bool, user: Bool) throws(Fault) -> UInt64 {
        guard Self.isCanonical(linear) else {
            nonCanonicalAccess = true  // #SS instead when the operand is on the stack segment (`handle`)
            throw Fault.gp()
        }
        if cr0 & CR.pg == 0 {
            if let c = confidential, linear < ramSize {  // without paging every access is private
                _ = try confidentialDataAccess(c, host: linear, gpa: linear, isPrivate: true, write: write)
            }
            return linear
        }
        if let shadow = shadowEntries { return try shadowWalk(linear, write: write, execute: execute, user: user, shadow) }
        pageWalks &+= 1
        var table = cr3 & Self.physicalAddressMask
        var writable = true, userOK = true, noExecute = false
        var level = 3
        let nxe = efer & CR.eferNXE != 0
        var reserved: UInt64 = ~((1 << Self.maxPhysicalAddressBits) - 1) & 0x7FFF_FFFF_FFFF_FFFF
        if !nxe { reserved |= 1 << 63 }
        if confidential != nil { reserved &= ~ConfidentialLayout.cBit }
        while true {
            let index = (linear >> UInt64(12 + 9 * level)) & 0x1FF
            let entryAddress = table + index * 8
            guard entryAddress + 8 <= ramSize else { throw pageFault(linear, present: false, write: write, execute: execute, user: user) }
            // The entry, after the second-level walk that finds it.
            pageWalkReferences &+= 1 &+ secondLevel.walkLevels(entryAddress)
            let entryHost = secondLevel.hostAddress(entryAddress)
            if let c = confidential { try confidentialTableAccess(c, host: entryHost, gpa: entryAddress) }
            let p = (ram + Int(entryHost)).assumingMemoryBound(to: UInt64.self)
            var entry = p.pointee
            guard entry & 1 != 0 else { throw pageFault(linear, present: false, write: write, execute: execute, user: user) }
            let large = level >= 1 && level <= 2 && entry & 0x80 != 0
            var rsvd = entry & reserved
            if level == 3 && entry & 0x80 != 0 { rsvd |= 0x80 }
            if large { rsvd |= entry & (level == 2 ? 0x3FFF_E000 : 0x1F_E000) }
            if rsvd != 0 { throw pageFault(linear, present: true, write: write, execute: execute, user: user, reserved: true) }
            writable = writable && entry & 2 != 0
            userOK = userOK && entry & 4 != 0
            noExecute = noExecute || (nxe && entry >> 63 != 0)
            if level == 0 || large {
                if user && !userOK { throw pageFault(linear, present: true, write: write, execute: execute, user: user) }
                if write && !writable && (user || cr0 & CR.wp != 0) {
                    throw pageFault(linear, present: true, write: write, execute: execute, user: user)
                }
                if execute && noExecute { throw pageFault(linear, present: true, write: write, execute: execute, user: user) }
                if !user && userOK && execute && cr4 & CR.smep != 0 {
                    throw pageFault(linear, present: true, write: write, execute: execute, user: user)
                }
                if !user && userOK && !execute && !supervisorMayUseUserPage(execute: false) {
                    throw pageFault(linear, present: true, write: write, execute: execute, user: user)
                }
                let newEntry = entry | 0x20 | (write ? 0x40 : 0)
                if newEntry != entry {
                    try secondLevelAccess(entryAddress, write: true, execute: false)
                    p.pointee = newEntry
                    confidential?.noteWrite(frame: Int(entryHost >> 12))
                    entry = newEntry
                }
                let shift = UInt64(12 + 9 * level)
                let mask: UInt64 = (1 << shift) - 1
                let gpa = (entry & Self.physicalAddressMask & ~mask) | (linear & mask)
                if gpa < ramSize {
                    pageWalkReferences &+= secondLevel.walkLevels(gpa)
                    try secondLevelAccess(gpa, write: write, execute: execute, userAddress: userOK, linear: linear)
                    var lineWritable = true
                    if let c = confidential {  // after the nested walk: reverse map, decryption
                        lineWritable = try confidentialDataAccess(c, host: secondLevel.hostAddress(gpa), gpa: gpa,
                                                                  isPrivate: execute || entry & ConfidentialLayout.cBit != 0, write: write)
                    }
                    let sl = secondLevel.permissions[Int(gpa >> 12)]
                    // Cache writes only once the second-level dirty flag is set, and only
                    // what both stages allow (so a cached entry never skips a check).
                    let writeOK = writable && entry & 0x40 != 0 && sl & 2 != 0 && secondLevel.dirty[Int(gpa >> 12)] != 0 && lineWritable
                    // From here on, accesses use the host frame the second stage maps to.
                    let host = secondLevel.hostAddress(gpa)
                    if sl & 1 != 0 {
                        let page = linear >> 12
                        let slot = Int(page & UInt64(Self.tlbSize - 1))
                        tlbTags[slot] = page &+ 1
                        tlbFrames[slot] = host & ~0xFFF
                        tlbBits[slot] = (writeOK ? TLBBits.writeOK : 0) | (userOK ? TLBBits.user : 0)
                            | (noExecute || sl & secondLevel.executeBit(userAddress: userOK) == 0 ? TLBBits.noExecute : 0)
                        if large { tlbHasLargePages = true }
                    }
                    return host
                }
                return gpa
            }
            if entry & 0x20 == 0 {
                try secondLevelAccess(entryAddress, write: true, execute: false)
                p.pointee = entry | 0x20
                confidential?.noteWrite(frame: Int(entryHost >> 12))
            }
            table = entry & Self.physicalAddressMask
            level -= 1
        }
    }

    func pageFault(_ linear: UInt64, present: Bool, write: Bool, execute: Bool, user: Bool, reserved: Bool = false) -> Fault {
        cr2 = linear
        var code: UInt32 = present ? 1 : 0
        if write { code |= 2 }
        if user { code |= 4 }
        if reserved { code |= 8 }
        if execute { code |= 0x10 }
        return .exception(vector: 14, errorCode: code)
    }

    // MARK: Memory access (linear addresses)

    @inline(__always)
    func read(_ linear: UInt64, size: Int) throws(Fault) -> UInt64 {
        try read(linear, size: size, user: cs.dpl == 3)
    }

    @inline(__always)
    func read(_ linear: UInt64, size: Int, user u: Bool) throws(Fault) -> UInt64 {
        if (linear & 0xFFF) + UInt64(size) <= 0x1000 {
            let gpa = try translate(linear, write: false, user: u)
            return try readPhysical(gpa, size: size)
        }
        // Crossing a page: translate both pages before reading either.
        let first = 0x1000 - Int(linear & 0xFFF)
        let g0 = try translate(linear, write: false, user: u)
        let g1 = try translate(linear &+ UInt64(first), write: false, user: u)
        var v: UInt64 = 0
        for i in 0..<size {
            let gpa = i < first ? g0 &+ UInt64(i) : g1 &+ UInt64(i - first)
            v |= try readPhysical(gpa, size: 1) << (8 * UInt64(i))
        }
        return v
    }

    @inline(__always)
    func readPhysical(_ gpa: UInt64, size: Int) throws(Fault) -> UInt64 {
        if gpa < ramSize && UInt64(size) <= ramSize - gpa {
            let p = ram + Int(gpa)
            let v: UInt64
            switch size {
            case 1: v = UInt64(p.load(as: UInt8.self))
            case 2: v = UInt64(p.loadUnaligned(as: UInt16.self))
            case 4: v = UInt64(p.loadUnaligned(as: UInt32.self))
            default: v = p.loadUnaligned(as: UInt64.self)
            }
            if lockedAccess.active { lockedAccess.noteRead(gpa, size, v) }
            return v
        }
        for held in heldMMIOReads where held.address == gpa && held.size == UInt8(size) { return held.value }
        throw .mmioRead(address: gpa, size: UInt8(size))
    }

    @inline(__always)
    func write(_ linear: UInt64, _ value: UInt64, size: Int) throws(Fault) {
        try write(linear, value, size: size, user: cs.dpl == 3)
    }

    @inline(__always)
    func write(_ linear: UInt64, _ value: UInt64, size: Int, user u: Bool) throws(Fault) {
        if (linear & 0xFFF) + UInt64(size) <= 0x1000 {
            let gpa = try translate(linear, write: true, user: u)
            writePhysical(gpa, value, size: size)
            return
        }
        // Check both pages before writing any byte, so a fault leaves memory untouched.
        let first = 0x1000 - Int(linear & 0xFFF)
        let g0 = try translate(linear, write: true, user: u)
        let g1 = try translate(linear &+ UInt64(first), write: true, user: u)
        for i in 0..<size {
            let gpa = i < first ? g0 &+ UInt64(i) : g1 &+ UInt64(i - first)
            writePhysical(gpa, value >> (8 * UInt64(i)), size: 1)
        }
    }

    @inline(__always)
    func writePhysical(_ gpa: UInt64, _ value: UInt64, size: Int) {
        if gpa < ramSize && UInt64(size) <= ramSize - gpa {
            let page = Int(gpa >> 12)
            CodePages.noteWrite(codeGens, page)
            let p = ram + Int(gpa)
            if lockedAccess.active && lockedAccess.covers(gpa, size) {
                lockedAccess.store(p, value)
                return
            }
            switch size {
            case 1: p.storeBytes(of: UInt8(truncatingIfNeeded: value), as: UInt8.self)
            case 2: p.storeBytes(of: UInt16(truncatingIfNeeded: value), as: UInt16.self)
            case 4: p.storeBytes(of: UInt32(truncatingIfNeeded: value), as: UInt32.self)
            default: p.storeBytes(of: value, as: UInt64.self)
            }
            return
        }
        let w = MMIOAccess(address: gpa, size: UInt8(size), direction: .write, value: value & Self.mask(size))
        if pendingMMIOWrite == nil { pendingMMIOWrite = w } else { moreMMIOWrites.append(w) }
        attention = true
    }

    // MARK: Stack

    @inline(__always)
    func push(_ value: UInt64, size: Int = 8) throws(Fault) {
        let rsp = gpr[4] &- UInt64(size)
        try write(rsp, value, size: size)
        gpr[4] = rsp
    }

    @inline(__always)
    func pop(size: Int = 8) throws(Fault) -> UInt64 {
        let v = try read(gpr[4], size: size)
        gpr[4] &+= UInt64(size)
        return v
    }

    // MARK: Instruction fetch

    /// The decoded instruction at RIP, from the cache when its page is unchanged.
    @inline(__always)
    func fetchDecoded() throws(Fault) -> UnsafeMutablePointer<Instr> {
        let r = rip
        let tag = (r >> 12) << 2 | UInt64(cs.dpl & 3)
        let gpa: UInt64
        if tag == fetchTag {
            gpa = fetchFrame | (r & 0xFFF)
        } else {
            let g = try translate(r, write: false, execute: true, user: cs.dpl == 3)
            guard g < ramSize else { throw Fault.fetchOutsideRAM(gpa: g) }
            fetchTag = tag
            fetchFrame = g & ~0xFFF
            gpa = g
        }
        let slot = icache + Int(truncatingIfNeeded: (gpa &* 0x9E37_79B9_7F4A_7C15) >> UInt64(64 - Self.icacheBits))
        if slot.pointee.tag == gpa && slot.pointee.gen == CodePages.generation(codeGens, Int(gpa >> 12)) { return slot }
        return try decodeInto(slot, rip: r, gpa: gpa)
    }

    private func decodeInto(_ slot: UnsafeMutablePointer<Instr>, rip r: UInt64, gpa: UInt64) throws(Fault) -> UnsafeMutablePointer<Instr> {
        decodes &+= 1
        var w = FetchWindow()
        fillWindow(&w, rip: r, gpa: gpa)
        slot.pointee.tag = ~0
        try decode(w, into: &slot.pointee)
        // Cache only instructions that lie within one page (their bytes are all on the
        // page whose generation guards the entry).
        if Int(gpa & 0xFFF) + Int(slot.pointee.length) <= 0x1000 {
            let page = Int(gpa >> 12)
            let mark = CodePages.markCode(codeGens, page)
            if mark.newlyMarked { dropTranslatorWrites(toPage: page) }  // its cached write permissions must go
            slot.pointee.gen = mark.generation
            slot.pointee.tag = gpa
        }
        return slot
    }

    // MARK: State exchange

    func load(_ s: VCPUState) {
        let g = s.gprs
        for i in 0..<16 { gpr[i] = g[i] }
        rip = s.rip; rflags = s.rflags | 0x2
        cs = s.cs; ss = s.ss; ds = s.ds; es = s.es; fs = s.fs; gs = s.gs; tr = s.tr; ldtr = s.ldtr
        gdt = s.gdt; idt = s.idt
        cr0 = s.cr0; cr2 = s.cr2; cr3 = s.cr3; cr4 = s.cr4; cr8 = s.cr8; efer = s.efer; apicBase = s.apicBase
        star = s.msrs[MSR.star] ?? 0; lstar = s.msrs[MSR.lstar] ?? 0; cstar = s.msrs[MSR.cstar] ?? 0
        fmask = s.msrs[MSR.fmask] ?? 0; pat = s.msrs[MSR.pat] ?? 0x0007_0406_0007_0406
        sysenterCS = s.msrs[MSR.sysenterCS] ?? 0; sysenterESP = s.msrs[MSR.sysenterESP] ?? 0
        sysenterEIP = s.msrs[MSR.sysenterEIP] ?? 0
        kernelGSBase = s.msrs[MSR.kernelGSBase] ?? 0
        if let tsc = s.msrs[MSR.tsc] { tscOffset = tsc &- instructions }
        if let f = s.fpu { fp.load(f) }
        // One shadow flag models both kinds: each covers exactly the next instruction.
        interruptShadow = !s.interruptBlocking.isDisjoint(with: [.bySTI, .byMovSS])
        nmiBlocked = s.interruptBlocking.contains(.nmi)
        dropHeldMMIOReads(); pendingMMIOWrite = nil; moreMMIOWrites.removeAll(keepingCapacity: true); pendingInsValue = nil; awaitingInsValue = false
        pendingInSize = 0; lastMMIORead = nil; pendingExit = nil; attention = false
        flushTLB()
    }

    func save() -> VCPUState {
        var s = VCPUState()
        s.gprs = (0..<16).map { gpr[$0] }
        s.rip = rip; s.rflags = rflags
        s.cs = cs; s.ss = ss; s.ds = ds; s.es = es; s.fs = fs; s.gs = gs; s.tr = tr; s.ldtr = ldtr
        s.gdt = gdt; s.idt = idt
        s.cr0 = cr0; s.cr2 = cr2; s.cr3 = cr3; s.cr4 = cr4; s.cr8 = cr8; s.efer = efer; s.apicBase = apicBase
        s.msrs = [MSR.star: star, MSR.lstar: lstar, MSR.cstar: cstar, MSR.fmask: fmask, MSR.kernelGSBase: kernelGSBase,
                  MSR.sysenterCS: sysenterCS, MSR.sysenterESP: sysenterESP, MSR.sysenterEIP: sysenterEIP, MSR.pat: pat,
                  MSR.tsc: instructions &+ tscOffset]
        s.fpu = fp.save()
        if interruptShadow { s.interruptBlocking.insert(.bySTI) }
        if nmiBlocked { s.interruptBlocking.insert(.nmi) }
        return s
    }
}
