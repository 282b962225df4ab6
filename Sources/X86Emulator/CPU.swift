import Synchronization
import VirtCore

/// Serialises LOCK-prefixed instructions (and XCHG with memory) across a VM's vCPU
/// threads, so guest atomics stay atomic when several interpreters share RAM.
final class AtomicInstructionLock: Sendable {
    let mutex = Mutex(())
}

/// RFLAGS bits.
enum Flag {
    static let cf: UInt64 = 1 << 0, pf: UInt64 = 1 << 2, af: UInt64 = 1 << 4, zf: UInt64 = 1 << 6
    static let sf: UInt64 = 1 << 7, tf: UInt64 = 1 << 8, `if`: UInt64 = 1 << 9, df: UInt64 = 1 << 10
    static let of: UInt64 = 1 << 11, iopl: UInt64 = 3 << 12, nt: UInt64 = 1 << 14, rf: UInt64 = 1 << 16
    static let ac: UInt64 = 1 << 18
    static let arithmetic: UInt64 = cf | pf | af | zf | sf | of
}

/// The architectural state of the software CPU and its view of guest memory. Registers
/// live in one unsafe buffer so the interpreter loop does no ARC or bounds-check work on
/// them. Owned by one vCPU thread.
final class CPU {
    let gpr: UnsafeMutablePointer<UInt64>
    var rip: UInt64 = 0
    var rflags: UInt64 = 0x2
    var cs = SegmentRegister(), ss = SegmentRegister(), ds = SegmentRegister(), es = SegmentRegister()
    var fs = SegmentRegister(), gs = SegmentRegister(), tr = SegmentRegister(), ldtr = SegmentRegister()
    var gdt = DescriptorTableRegister(), idt = DescriptorTableRegister()
    var cr0: UInt64 = 0x6000_0010, cr2: UInt64 = 0, cr3: UInt64 = 0, cr4: UInt64 = 0, cr8: UInt64 = 0
    var efer: UInt64 = 0
    var apicBase: UInt64 = 0xFEE0_0900
    var msrs: [UInt32: UInt64] = [:]
    var kernelGSBase: UInt64 = 0
    var tscOffset: UInt64 = 0
    /// Set by STI (when it enables IF) and MOV SS/POP SS: no interrupt is taken before the
    /// next instruction completes.
    var interruptShadow = false
    /// Instructions retired (the TSC and the preemption timer count these).
    var instructions: UInt64 = 0

    let ram: UnsafeMutableRawPointer
    let ramSize: UInt64

    /// Value for the MMIO read that stopped the last attempt at the current instruction.
    var pendingMMIORead: (address: UInt64, size: UInt8, value: UInt64)?
    /// An MMIO write made by the current instruction, reported once it completes.
    var pendingMMIOWrite: MMIOAccess?
    /// Size of the `in` whose value `completeRead` will put in RAX (0: none).
    var pendingInSize = 0
    /// An `ins` element the VMM supplied; the re-executed `ins` stores it at [RDI].
    var pendingInsValue: UInt64?
    /// Set while an `ins` waits for its value (so `completeRead` knows where it goes).
    var awaitingInsValue = false

    let atomicLock: AtomicInstructionLock

    /// A direct-mapped TLB of 4 KiB translations: tag = linear page + 1 (0 = empty), the
    /// guest-physical frame, and what the cached walk allows (see `TLBBits`).
    static let tlbSize = 512
    let tlbTags: UnsafeMutablePointer<UInt64>
    let tlbFrames: UnsafeMutablePointer<UInt64>
    let tlbBits: UnsafeMutablePointer<UInt8>

    enum TLBBits {
        /// Writable, and the leaf's dirty bit is already set (so a write needs no walk).
        static let writeOK: UInt8 = 1
        static let user: UInt8 = 2
        static let noExecute: UInt8 = 4
    }

    init(memory: GuestMemory, atomicLock: AtomicInstructionLock) {
        self.atomicLock = atomicLock
        tlbTags = .allocate(capacity: Self.tlbSize)
        tlbTags.initialize(repeating: 0, count: Self.tlbSize)
        tlbFrames = .allocate(capacity: Self.tlbSize)
        tlbFrames.initialize(repeating: 0, count: Self.tlbSize)
        tlbBits = .allocate(capacity: Self.tlbSize)
        tlbBits.initialize(repeating: 0, count: Self.tlbSize)
        gpr = .allocate(capacity: 16)
        gpr.initialize(repeating: 0, count: 16)
        ram = memory.base
        ramSize = memory.size
    }

    deinit {
        gpr.deallocate()
        tlbTags.deallocate()
        tlbFrames.deallocate()
        tlbBits.deallocate()
    }

    /// Drops every cached translation (CR0/CR3/CR4 writes, INVLPG, state loads).
    func flushTLB() { tlbTags.update(repeating: 0, count: Self.tlbSize) }

    var cpl: UInt8 { cs.dpl }

    // MARK: Linear → physical

    /// Translates a linear address through the guest's 4-level page tables, checking
    /// present, writable (CR0.WP at CPL0), user and NX, and setting accessed/dirty bits.
    @inline(__always)
    func translate(_ linear: UInt64, write: Bool, execute: Bool = false, user: Bool) throws(Fault) -> UInt64 {
        if cr0 & 0x8000_0000 == 0 { return linear }
        let page = linear >> 12
        let slot = Int(page & UInt64(Self.tlbSize - 1))
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

    /// SMEP and SMAP, for a supervisor access to a user page.
    @inline(__always)
    func supervisorMayUseUserPage(execute: Bool) -> Bool {
        execute ? cr4 & (1 << 20) == 0 : (cr4 & (1 << 21) == 0 || rflags & Flag.ac != 0)
    }

    /// The page walk behind `translate`; fills the TLB on success.
    func walk(_ linear: UInt64, write: Bool, execute: Bool, user: Bool) throws(Fault) -> UInt64 {
        var table = cr3 & 0x000F_FFFF_FFFF_F000
        var writable = true, userOK = true, noExecute = false
        var level = 3
        while true {
            let index = (linear >> UInt64(12 + 9 * level)) & 0x1FF
            let entryAddress = table + index * 8
            guard entryAddress + 8 <= ramSize else { throw pageFault(linear, present: false, write: write, execute: execute, user: user) }
            let p = (ram + Int(entryAddress)).assumingMemoryBound(to: UInt64.self)
            var entry = p.pointee
            guard entry & 1 != 0 else { throw pageFault(linear, present: false, write: write, execute: execute, user: user) }
            writable = writable && entry & 2 != 0
            userOK = userOK && entry & 4 != 0
            noExecute = noExecute || (entry >> 63 != 0 && efer & 0x800 != 0)
            let leaf = level == 0 || (level <= 2 && entry & 0x80 != 0)
            if leaf {
                if user && !userOK { throw pageFault(linear, present: true, write: write, execute: execute, user: user) }
                if write && !writable && (user || cr0 & 0x1_0000 != 0) {
                    throw pageFault(linear, present: true, write: write, execute: execute, user: user)
                }
                if execute && noExecute { throw pageFault(linear, present: true, write: write, execute: execute, user: user) }
                if !user && userOK && execute && cr4 & (1 << 20) != 0 {  // SMEP
                    throw pageFault(linear, present: true, write: write, execute: execute, user: user)
                }
                if !user && userOK && !execute && cr4 & (1 << 21) != 0 && rflags & Flag.ac == 0 {  // SMAP
                    throw pageFault(linear, present: true, write: write, execute: execute, user: user)
                }
                let newEntry = entry | 0x20 | (write ? 0x40 : 0)
                if newEntry != entry { p.pointee = newEntry; entry = newEntry }
                let shift = UInt64(12 + 9 * level)
                let mask: UInt64 = (1 << shift) - 1
                let gpa = (entry & 0x000F_FFFF_FFFF_F000 & ~mask) | (linear & mask)
                if gpa < ramSize {
                    let page = linear >> 12
                    let slot = Int(page & UInt64(Self.tlbSize - 1))
                    tlbTags[slot] = page &+ 1
                    tlbFrames[slot] = gpa & ~0xFFF
                    tlbBits[slot] = (writable && entry & 0x40 != 0 ? TLBBits.writeOK : 0) | (userOK ? TLBBits.user : 0)
                        | (noExecute ? TLBBits.noExecute : 0)
                }
                return gpa
            }
            if entry & 0x20 == 0 { p.pointee = entry | 0x20 }
            table = entry & 0x000F_FFFF_FFFF_F000
            level -= 1
        }
    }

    func pageFault(_ linear: UInt64, present: Bool, write: Bool, execute: Bool, user: Bool) -> Fault {
        cr2 = linear
        var code: UInt32 = present ? 1 : 0
        if write { code |= 2 }
        if user { code |= 4 }
        if execute { code |= 0x10 }
        return .exception(vector: 14, errorCode: code)
    }

    // MARK: Memory access (linear addresses)

    @inline(__always)
    func read(_ linear: UInt64, size: Int, user: Bool? = nil) throws(Fault) -> UInt64 {
        let u = user ?? (cpl == 3)
        if (linear & 0xFFF) + UInt64(size) <= 0x1000 {
            let gpa = try translate(linear, write: false, user: u)
            return try readPhysical(gpa, size: size)
        }
        var v: UInt64 = 0
        for i in 0..<size {
            let gpa = try translate(linear &+ UInt64(i), write: false, user: u)
            v |= try readPhysical(gpa, size: 1) << (8 * UInt64(i))
        }
        return v
    }

    @inline(__always)
    func readPhysical(_ gpa: UInt64, size: Int) throws(Fault) -> UInt64 {
        if gpa < ramSize && UInt64(size) <= ramSize - gpa {
            let p = ram + Int(gpa)
            switch size {
            case 1: return UInt64(p.load(as: UInt8.self))
            case 2: return UInt64(p.loadUnaligned(as: UInt16.self))
            case 4: return UInt64(p.loadUnaligned(as: UInt32.self))
            default: return p.loadUnaligned(as: UInt64.self)
            }
        }
        if let pending = pendingMMIORead, pending.address == gpa, pending.size == UInt8(size) {
            pendingMMIORead = nil
            return pending.value
        }
        throw .mmioRead(address: gpa, size: UInt8(size))
    }

    @inline(__always)
    func write(_ linear: UInt64, _ value: UInt64, size: Int, user: Bool? = nil) throws(Fault) {
        let u = user ?? (cpl == 3)
        if (linear & 0xFFF) + UInt64(size) <= 0x1000 {
            let gpa = try translate(linear, write: true, user: u)
            writePhysical(gpa, value, size: size)
            return
        }
        // Check every byte's page before writing any, so a fault leaves memory untouched.
        var gpas: (UInt64, UInt64, UInt64, UInt64, UInt64, UInt64, UInt64, UInt64) = (0, 0, 0, 0, 0, 0, 0, 0)
        try withUnsafeMutableBytes(of: &gpas) { raw throws(Fault) in
            let g = raw.bindMemory(to: UInt64.self)
            for i in 0..<size { g[i] = try translate(linear &+ UInt64(i), write: true, user: u) }
            for i in 0..<size { writePhysical(g[i], value >> (8 * UInt64(i)), size: 1) }
        }
    }

    @inline(__always)
    func writePhysical(_ gpa: UInt64, _ value: UInt64, size: Int) {
        if gpa < ramSize && UInt64(size) <= ramSize - gpa {
            let p = ram + Int(gpa)
            switch size {
            case 1: p.storeBytes(of: UInt8(truncatingIfNeeded: value), as: UInt8.self)
            case 2: p.storeBytes(of: UInt16(truncatingIfNeeded: value), as: UInt16.self)
            case 4: p.storeBytes(of: UInt32(truncatingIfNeeded: value), as: UInt32.self)
            default: p.storeBytes(of: value, as: UInt64.self)
            }
            return
        }
        pendingMMIOWrite = MMIOAccess(address: gpa, size: UInt8(size), direction: .write, value: value)
    }

    // MARK: Stack

    @inline(__always)
    func push(_ value: UInt64) throws(Fault) {
        let rsp = gpr[4] &- 8
        try write(rsp, value, size: 8)
        gpr[4] = rsp
    }

    @inline(__always)
    func pop() throws(Fault) -> UInt64 {
        let v = try read(gpr[4], size: 8)
        gpr[4] &+= 8
        return v
    }

    // MARK: State exchange

    func load(_ s: VCPUState) {
        let g = s.gprs
        for i in 0..<16 { gpr[i] = g[i] }
        rip = s.rip; rflags = s.rflags | 0x2
        cs = s.cs; ss = s.ss; ds = s.ds; es = s.es; fs = s.fs; gs = s.gs; tr = s.tr; ldtr = s.ldtr
        gdt = s.gdt; idt = s.idt
        cr0 = s.cr0; cr2 = s.cr2; cr3 = s.cr3; cr4 = s.cr4; cr8 = s.cr8; efer = s.efer; apicBase = s.apicBase
        msrs = s.msrs
        kernelGSBase = s.msrs[MSR.kernelGSBase] ?? 0
        flushTLB()
    }

    func save() -> VCPUState {
        var s = VCPUState()
        s.gprs = (0..<16).map { gpr[$0] }
        s.rip = rip; s.rflags = rflags
        s.cs = cs; s.ss = ss; s.ds = ds; s.es = es; s.fs = fs; s.gs = gs; s.tr = tr; s.ldtr = ldtr
        s.gdt = gdt; s.idt = idt
        s.cr0 = cr0; s.cr2 = cr2; s.cr3 = cr3; s.cr4 = cr4; s.cr8 = cr8; s.efer = efer; s.apicBase = apicBase
        s.msrs = msrs
        s.msrs[MSR.kernelGSBase] = kernelGSBase
        s.msrs[MSR.tsc] = instructions &+ tscOffset
        return s
    }
}
