import Dispatch
import Synchronization
import VirtCore

/// What a local APIC asks of the machine: deliver a vector to a vCPU, and the INIT and
/// STARTUP messages that start application processors; and, optionally, the vCPUs' own
/// clocks for the timers.
public struct LocalAPICWiring: Sendable {
    public var deliver: @Sendable (_ vcpu: Int, _ vector: UInt8) -> Void
    public var initCPU: @Sendable (_ vcpu: Int) -> Void
    public var startup: @Sendable (_ vcpu: Int, _ vector: UInt8) -> Void
    public var guestClock: LocalAPICGuestClock?
    /// The ExtINT request toward a vCPU (the 8259's INTR as LINT0 passes it), asserted or not.
    public var externalInterrupt: (@Sendable (_ vcpu: Int, _ asserted: Bool) -> Void)?
    public init(deliver: @escaping @Sendable (Int, UInt8) -> Void, initCPU: @escaping @Sendable (Int) -> Void,
                startup: @escaping @Sendable (Int, UInt8) -> Void, guestClock: LocalAPICGuestClock? = nil,
                externalInterrupt: (@Sendable (Int, Bool) -> Void)? = nil) {
        self.deliver = deliver; self.initCPU = initCPU; self.startup = startup; self.guestClock = guestClock
        self.externalInterrupt = externalInterrupt
    }
}

/// Each vCPU's time-stamp counter as the timers' clock (one tick per TSC tick), with the
/// vCPU arming the next expiry itself and reporting it through `timerDeadlineReached` —
/// as KVM's timer shares the guest TSC's clock, so what a guest measures with RDTSC and
/// the timer agree however loaded the host is. Both are called on that vCPU's thread.
/// Without it the timers count host nanoseconds and fire from dispatch timers.
public struct LocalAPICGuestClock: Sendable {
    public var now: @Sendable (_ vcpu: Int) -> UInt64
    public var arm: @Sendable (_ vcpu: Int, _ deadline: UInt64?) -> Void
    public init(now: @escaping @Sendable (Int) -> UInt64, arm: @escaping @Sendable (Int, UInt64?) -> Void) {
        self.now = now; self.arm = arm
    }
}

/// One local APIC per vCPU, in xAPIC form (a page at the vCPU's IA32_APIC_BASE, normally
/// 0xFEE00000, which each vCPU sees as its own) and x2APIC form (MSRs 0x800–0x8FF, through
/// `PlatformMSRHandler`): ID, version, TPR/PPR (CR8 is TPR[7:4]), EOI, LDR/DFR, SVR,
/// ISR/TMR/IRR, ESR, ICR (fixed, NMI, INIT, STARTUP with the destination shorthands,
/// physical, flat and cluster logical destinations, x2APIC logical IDs), the LVT and the
/// timer (one-shot, periodic, TSC-deadline) counting at 1 GHz: on the vCPU's TSC when the
/// wiring gives its clock, host time otherwise.
///
/// IA32_APIC_BASE (MSR 0x1B) is kept here too: its state machine (disabled, xAPIC, x2APIC;
/// SDM Vol. 3A §10.12.5 — no x2APIC → xAPIC or disabled → x2APIC step, EN=0 with EXTD=1
/// invalid) and where the xAPIC page is. A disabled APIC, or one in x2APIC mode, does not
/// answer at its page (the bus reads all-ones there).
///
/// An accepted interrupt is requested (IRR) and handed to the vCPU at once; the engine
/// takes it once RFLAGS.IF is set and its priority class is above the processor priority
/// (TPR and the highest in-service vector), acknowledging it here (IRR → ISR). EOI and TPR
/// writes lower the priority, and the next one is taken.
public final class LocalAPICBank: PlatformMSRHandler, PlatformInterruptController, ExternalInterruptController, Sendable {
    public static let base: UInt64 = 0xFEE0_0000
    public static let tscDeadlineMSR: UInt32 = 0x6E0
    public static let apicBaseMSR: UInt32 = 0x1B
    static let baseEnable: UInt64 = 1 << 11
    static let baseAddressMask: UInt64 = 0xFF_FFFF_F000
    /// The timer's input clock (and the TSC rate the deadline mode assumes): 1 GHz.
    public static let timerHz: UInt64 = 1_000_000_000

    struct Registers {
        /// IA32_APIC_BASE: page address, EN (11), EXTD (10), BSP (8).
        var base: UInt64
        /// The xAPIC ID (bits 31:24 of register 0x20), writable in xAPIC mode; starts as the
        /// vCPU's index, which stays the x2APIC ID (read-only).
        var xapicID: UInt32
        var tpr: UInt32 = 0, ldr: UInt32 = 0, dfr: UInt32 = 0xFFFF_FFFF, svr: UInt32 = 0xFF, esr: UInt32 = 0
        var icrHigh: UInt32 = 0
        var lvt = [UInt32](repeating: 0x1_0000, count: 7)  // timer, CMCI→thermal, perf, LINT0, LINT1, error (masked)
        var isr = [UInt32](repeating: 0, count: 8), irr = [UInt32](repeating: 0, count: 8), tmr = [UInt32](repeating: 0, count: 8)
        var initialCount: UInt32 = 0, divide: UInt32 = 0
        /// Host time the current count (or, periodic, the current period) started from; a
        /// one-shot count that reached 0 and was then made periodic stays stopped until
        /// the next initial-count write; the TSC deadline armed (0: none).
        var countStart: UInt64 = 0
        var countStopped = false
        var deadline: UInt64 = 0
        var timer: DispatchSourceTimer?
        var timerGeneration: UInt64 = 0
    }

    /// One APIC's registers behind its lock.
    private final class Unit: Sendable {
        let state: Mutex<Registers>
        init(index: Int) {
            var r = Registers(base: 0xFEE0_0000 | LocalAPICBank.baseEnable | (index == 0 ? 0x100 : 0), xapicID: UInt32(index & 0xFF))
            // The boot CPU's LINT0 as a PC BIOS leaves it: ExtINT, unmasked (virtual wire, as KVM and QEMU reset it).
            if index == 0 { r.lvt[LocalAPICBank.lint0] = LocalAPICBank.extINTMode }
            state = Mutex(r)
        }
    }
    private let apics: [Unit]
    private let wiring: LocalAPICWiring
    private let queue = DispatchQueue(label: "swiftvisor.lapic-timer")
    /// The I/O APIC's EOI for level-triggered vectors (set once, before the guest runs).
    private let levelEOI = LockedFunction<@Sendable (UInt8) -> Void>()
    /// The LVT index of LINT0, and its delivery mode ExtINT.
    static let lint0 = 3
    static let extINTMode: UInt32 = 0x700
    /// The level of the boot CPU's LINT0 input (the 8259's INTR), and the 8259's acknowledge.
    private let lint0Level = Atomic<Bool>(false)
    private let externalAcknowledge = LockedFunction<@Sendable () -> UInt8>()

    public func setLevelEOIHandler(_ handler: @escaping @Sendable (UInt8) -> Void) { levelEOI.set(handler) }

    // MARK: LINT0 and ExtINT

    /// The interrupt controller behind the boot CPU's LINT0: its acknowledge gives the
    /// vector of an ExtINT. Set before the guest runs.
    public func connectExternalInterruptController(acknowledge: @escaping @Sendable () -> UInt8) { externalAcknowledge.set(acknowledge) }

    /// The boot CPU's LINT0 input (the 8259's INTR) at `level`.
    public func setLINT0(_ level: Bool) {
        lint0Level.store(level, ordering: .releasing)
        updateExternalInterrupt()
    }

    /// Whether APIC `vcpu` passes its LINT0 input on as ExtINT: when it is globally disabled
    /// (IA32_APIC_BASE.EN clear: the input goes to the core as it is), or its LVT LINT0 entry
    /// is unmasked with delivery mode ExtINT.
    private func passesExtINT(vcpu: Int) -> Bool {
        guard vcpu == 0, vcpu < apics.count else { return false }
        return apics[vcpu].state.withLock { r in
            r.base & Self.baseEnable == 0 || r.lvt[Self.lint0] & 0x1_0700 == Self.extINTMode
        }
    }

    /// Tells the boot CPU whether an ExtINT is requested now (after LINT0's level, its LVT
    /// entry or the APIC's enable changed).
    private func updateExternalInterrupt() {
        guard let request = wiring.externalInterrupt, !apics.isEmpty else { return }
        request(0, lint0Level.load(ordering: .acquiring) && passesExtINT(vcpu: 0))
    }

    public func acknowledgeExternalInterrupt(vcpu: Int) -> UInt8? {
        guard passesExtINT(vcpu: vcpu), let acknowledge = externalAcknowledge.function else {
            if vcpu == 0 { updateExternalInterrupt() }  // a request the vCPU still saw raced with its withdrawal
            return nil
        }
        return acknowledge()
    }
    public var count: Int { apics.count }

    /// Whether the APICs have x2APIC mode (CPUID.1:ECX.x2APIC): without it, setting
    /// IA32_APIC_BASE.EXTD is a #GP, as on a processor without x2APIC.
    public let x2APICAvailable: Bool

    public init(vcpuCount: Int, x2APIC: Bool = true, wiring: LocalAPICWiring) {
        apics = (0..<vcpuCount).map { Unit(index: $0) }
        x2APICAvailable = x2APIC
        self.wiring = wiring
    }

    deinit {
        for a in apics { a.state.withLock { $0.timer?.cancel() } }
    }

    // MARK: Register access

    private enum Mode { case disabled, xAPIC, x2APIC }
    private static func mode(_ base: UInt64) -> Mode {
        base & baseEnable == 0 ? .disabled : (base & x2APICEnable != 0 ? .x2APIC : .xAPIC)
    }

    /// Where `address` falls in vCPU `vcpu`'s xAPIC page, or nil when its APIC does not
    /// answer there (elsewhere, disabled, or in x2APIC mode).
    public func mmioOffset(vcpu: Int, address: UInt64) -> UInt64? {
        guard vcpu < apics.count else { return nil }
        let base = apics[vcpu].state.withLock { $0.base }
        guard Self.mode(base) == .xAPIC, address & ~0xFFF == base & Self.baseAddressMask else { return nil }
        return address & 0xFFF
    }

    /// A WRMSR to IA32_APIC_BASE (reserved bits already checked by the CPU): false (#GP)
    /// for an invalid state or transition.
    private func setBase(vcpu: Int, _ value: UInt64) -> Bool {
        guard value & Self.x2APICEnable == 0 || (x2APICAvailable && value & Self.baseEnable != 0) else { return false }  // EXTD without EN or x2APIC
        defer { if vcpu == 0 { updateExternalInterrupt() } }
        return apics[vcpu].state.withLock { r -> Bool in
            let old = Self.mode(r.base), new = Self.mode(value)
            if old == .x2APIC && new == .xAPIC { return false }
            if old == .disabled && new == .x2APIC { return false }
            // Disabling resets the APIC: the xAPIC ID is the initial one again (SDM Vol. 3A §10.4.3).
            if new == .disabled { r.xapicID = UInt32(vcpu & 0xFF) }
            r.base = value
            return true
        }
    }

    /// The task-priority class (CR8 = TPR[7:4]).
    public func taskPriorityClass(vcpu: Int) -> UInt8 {
        guard vcpu < apics.count else { return 0 }
        return UInt8(truncatingIfNeeded: apics[vcpu].state.withLock { $0.tpr } >> 4)
    }

    public func setTaskPriorityClass(vcpu: Int, _ value: UInt8) {
        guard vcpu < apics.count else { return }
        apics[vcpu].state.withLock { $0.tpr = UInt32(value & 0xF) << 4 }
    }

    /// xAPIC MMIO from vCPU `vcpu` at `offset` within the APIC page.
    public func mmioRead(vcpu: Int, offset: UInt64, size: UInt8) -> UInt64 {
        guard vcpu < apics.count, offset & 0xF == 0 else { return 0 }
        let index = Int(offset >> 4)
        if index == 0x02 { return UInt64(apics[vcpu].state.withLock { $0.xapicID }) << 24 }
        return UInt64(read(vcpu: vcpu, index: index) ?? 0)
    }

    public func mmioWrite(vcpu: Int, offset: UInt64, size: UInt8, value: UInt64) {
        guard vcpu < apics.count, offset & 0xF == 0 else { return }
        let index = Int(offset >> 4)
        if index == 0x30 {
            let high = apics[vcpu].state.withLock { $0.icrHigh }
            sendIPI(from: vcpu, low: UInt32(truncatingIfNeeded: value), destination: high >> 24, x2APIC: false)
            return
        }
        if index == 0x31 { apics[vcpu].state.withLock { $0.icrHigh = UInt32(truncatingIfNeeded: value) }; return }
        // The xAPIC ID is writable (KVM and QEMU let software change it; several APICs may then
        // share one, and a physical message reaches each of them: kvm-unit-tests' xapic entry).
        if index == 0x02 { apics[vcpu].state.withLock { $0.xapicID = UInt32(truncatingIfNeeded: value) >> 24 }; return }
        write(vcpu: vcpu, index: index, value: UInt32(truncatingIfNeeded: value))
    }

    /// x2APIC registers (MSR 0x800 + offset >> 4): read-only, read-write, write-only.
    private static let x2APICReadOnly: Set<Int> = Set([0x02, 0x03, 0x0A, 0x0D, 0x39]).union(0x10...0x27)
    private static let x2APICReadWrite: Set<Int> = [0x08, 0x0F, 0x28, 0x30, 0x32, 0x33, 0x34, 0x35, 0x36, 0x37, 0x38, 0x3E]
    private static let x2APICWriteOnly: Set<Int> = [0x0B, 0x3F]
    static let x2APICEnable: UInt64 = 1 << 10

    public func readMSR(vcpu: Int, index: UInt32, tsc: UInt64, apicBase: UInt64) -> UInt64? {
        guard vcpu < apics.count else { return nil }
        if index == Self.tscDeadlineMSR { return apics[vcpu].state.withLock { $0.deadline } }
        if index == Self.apicBaseMSR { return apics[vcpu].state.withLock { $0.base } }
        guard index >= 0x800, index <= 0x8FF, Self.mode(apics[vcpu].state.withLock { $0.base }) == .x2APIC else { return nil }
        let reg = Int(index - 0x800)
        guard Self.x2APICReadOnly.contains(reg) || Self.x2APICReadWrite.contains(reg) else { return nil }
        switch reg {
        case 0x02: return UInt64(vcpu)
        case 0x0D: return UInt64(((vcpu >> 4) << 16) | (1 << (vcpu & 15)))  // x2APIC logical ID
        case 0x30: return apics[vcpu].state.withLock { UInt64($0.icrHigh) << 32 }
        default: return read(vcpu: vcpu, index: reg).map(UInt64.init)
        }
    }

    public func writeMSR(vcpu: Int, index: UInt32, value: UInt64, tsc: UInt64, apicBase: UInt64) -> Bool {
        guard vcpu < apics.count else { return false }
        if index == Self.tscDeadlineMSR {
            armDeadline(vcpu: vcpu, deadline: value, tsc: tsc)
            return true
        }
        if index == Self.apicBaseMSR { return setBase(vcpu: vcpu, value) }
        guard index >= 0x800, index <= 0x8FF, Self.mode(apics[vcpu].state.withLock { $0.base }) == .x2APIC else { return false }
        let reg = Int(index - 0x800)
        guard Self.x2APICReadWrite.contains(reg) || Self.x2APICWriteOnly.contains(reg) else { return false }
        guard reg == 0x30 || value >> 32 == 0 else { return false }  // bits 63:32 are reserved except in the ICR
        switch reg {
        case 0x30:
            sendIPI(from: vcpu, low: UInt32(truncatingIfNeeded: value), destination: UInt32(truncatingIfNeeded: value >> 32), x2APIC: true)
        case 0x3F:  // SELF IPI: a vector only
            guard value & ~0xFF == 0 else { return false }
            accept(vcpu: vcpu, vector: UInt8(truncatingIfNeeded: value))
        case 0x0B, 0x28:  // EOI and ESR take 0 only
            guard value == 0 else { return false }
            write(vcpu: vcpu, index: reg, value: 0)
        default: write(vcpu: vcpu, index: reg, value: UInt32(truncatingIfNeeded: value))
        }
        return true
    }

    private func read(vcpu: Int, index: Int) -> UInt32? {
        apics[vcpu].state.withLock { r -> UInt32? in
            switch index {
            case 0x03: return 0x0005_0014  // version 0x14, six LVT entries
            case 0x08: return r.tpr
            case 0x0A: return Self.processorPriority(r)
            case 0x0B: return 0
            case 0x0D: return r.ldr
            case 0x0E: return r.dfr
            case 0x0F: return r.svr
            case 0x10...0x17: return r.isr[index - 0x10]
            case 0x18...0x1F: return r.tmr[index - 0x18]
            case 0x20...0x27: return r.irr[index - 0x20]
            case 0x28: return r.esr
            case 0x30: return 0  // delivery status: always idle
            case 0x31: return r.icrHigh
            case 0x32...0x37: return r.lvt[index - 0x32]
            case 0x38: return r.initialCount
            case 0x39: return Self.currentCount(r, now: now(vcpu))
            case 0x3E: return r.divide
            default: return nil
            }
        }
    }

    private func write(vcpu: Int, index: Int, value: UInt32) {
        switch index {
        case 0x08:
            apics[vcpu].state.withLock { $0.tpr = value & 0xFF }
        case 0x0B: endOfInterrupt(vcpu: vcpu)
        case 0x0D: apics[vcpu].state.withLock { $0.ldr = value & 0xFF00_0000 }
        case 0x0E: apics[vcpu].state.withLock { $0.dfr = value | 0x0FFF_FFFF }
        case 0x0F: apics[vcpu].state.withLock { $0.svr = value & 0x13FF }
        case 0x28: apics[vcpu].state.withLock { $0.esr = 0 }
        case 0x32:
            apics[vcpu].state.withLock { r in changeTimerMode(vcpu: vcpu, &r, lvt: value & 0x7_10FF) }
        case 0x33...0x37:
            apics[vcpu].state.withLock { $0.lvt[index - 0x32] = value & 0x1_17FF }
            if index - 0x32 == Self.lint0 && vcpu == 0 { updateExternalInterrupt() }
        case 0x38: startCount(vcpu: vcpu, value)
        case 0x3E: apics[vcpu].state.withLock { $0.divide = value & 0xB }
        default: break
        }
    }

    // MARK: Interrupts

    private static func highest(_ bits: [UInt32]) -> Int? {
        for w in stride(from: 7, through: 0, by: -1) where bits[w] != 0 { return w * 32 + 31 - bits[w].leadingZeroBitCount }
        return nil
    }

    private static func processorPriority(_ r: Registers) -> UInt32 {
        let isrClass = UInt32((highest(r.isr) ?? 0) & 0xF0)
        return r.tpr & 0xF0 >= isrClass ? r.tpr : isrClass
    }

    /// A fixed interrupt for `vcpu`: requested now, delivered when its priority allows.
    /// `level`: level-triggered (its EOI goes to the I/O APIC).
    @discardableResult
    public func accept(vcpu: Int, vector: UInt8, level: Bool = false) -> Bool {
        guard vcpu < apics.count, vector >= 16 else { return false }
        let enabled = apics[vcpu].state.withLock { r -> Bool in
            guard r.svr & 0x100 != 0, r.base & Self.baseEnable != 0 else { return false }  // a disabled APIC drops it
            r.irr[Int(vector >> 5)] |= 1 << UInt32(vector & 31)
            let bit: UInt32 = 1 << UInt32(vector & 31)
            if level { r.tmr[Int(vector >> 5)] |= bit } else { r.tmr[Int(vector >> 5)] &= ~bit }
            return true
        }
        if enabled { wiring.deliver(vcpu, vector) }
        return enabled
    }

    public func processorPriority(vcpu: Int) -> UInt8 {
        guard vcpu < apics.count else { return 0 }
        return UInt8(truncatingIfNeeded: apics[vcpu].state.withLock { Self.processorPriority($0) })
    }

    public func acknowledge(vcpu: Int, vector: UInt8) {
        guard vcpu < apics.count else { return }
        apics[vcpu].state.withLock { r in
            let bit: UInt32 = 1 << UInt32(vector & 31)
            r.irr[Int(vector >> 5)] &= ~bit
            r.isr[Int(vector >> 5)] |= bit
        }
    }

    private func endOfInterrupt(vcpu: Int) {
        let levelVector = apics[vcpu].state.withLock { r -> UInt8? in
            guard let v = Self.highest(r.isr) else { return nil }
            let bit: UInt32 = 1 << UInt32(v & 31)
            r.isr[v >> 5] &= ~bit
            return r.tmr[v >> 5] & bit != 0 ? UInt8(v) : nil
        }
        if let v = levelVector, let eoi = levelEOI.function { eoi(v) }
    }

    /// An interrupt message from the I/O APIC (xAPIC destination format).
    public func deliverMessage(vector: UInt8, mode: UInt32, logical: Bool, destination: UInt32, level: Bool) {
        for t in targets(source: 0, shorthand: 0, logical: logical, destination: destination, x2APIC: false) {
            switch mode {
            case 0, 1: accept(vcpu: t, vector: vector, level: level)
            case 4: wiring.deliver(t, 2)
            default: break
            }
            if mode == 1 { break }  // lowest priority: one of them
        }
    }

    private func targets(source: Int, shorthand: UInt32, logical: Bool, destination: UInt32, x2APIC: Bool) -> [Int] {
        switch shorthand {
        case 1: return [source]
        case 2: return Array(0..<apics.count)
        case 3: return (0..<apics.count).filter { $0 != source }
        default:
            let broadcast: UInt32 = x2APIC ? 0xFFFF_FFFF : 0xFF
            if destination == broadcast { return Array(0..<apics.count) }
            if !logical {
                // x2APIC IDs are the vCPU indexes; an xAPIC-format message matches each APIC in
                // xAPIC mode by its (writable) xAPIC ID, one in x2APIC mode by its index.
                if x2APIC { return Int(destination) < apics.count ? [Int(destination)] : [] }
                return (0..<apics.count).filter { id in
                    apics[id].state.withLock { r in Self.mode(r.base) == .x2APIC ? UInt32(id) == destination : r.xapicID == destination }
                }
            }
            return (0..<apics.count).filter { id in
                apics[id].state.withLock { Self.matchesLogical($0, id: id, destination: destination) }
            }
        }
    }

    /// Logical destination `destination` names APIC `id`: in x2APIC mode by its logical ID
    /// (cluster id >> 4 in bits 31:16, one of 16 bits below; an 8-bit xAPIC-format message
    /// addresses cluster 0); in xAPIC mode by its LDR, flat (one of 8 bits) or cluster
    /// (DFR model 0: cluster in bits 7:4, one of 4 bits below).
    private static func matchesLogical(_ r: Registers, id: Int, destination: UInt32) -> Bool {
        if mode(r.base) == .x2APIC {
            let ldr = UInt32(((id >> 4) << 16) | (1 << (id & 15)))
            return ldr >> 16 == destination >> 16 && ldr & destination & 0xFFFF != 0
        }
        let logicalID = r.ldr >> 24, d = destination & 0xFF
        if r.dfr >> 28 == 0xF { return logicalID & d != 0 }
        return logicalID >> 4 == d >> 4 && logicalID & d & 0xF != 0
    }

    private func sendIPI(from source: Int, low: UInt32, destination: UInt32, x2APIC: Bool) {
        let logical = low & 0x800 != 0
        let shorthand = (low >> 18) & 3
        for t in targets(source: source, shorthand: shorthand, logical: logical, destination: destination, x2APIC: x2APIC) {
            deliver(to: t, low: low)
        }
    }

    // MARK: KVM's PV send-IPI hypercall

    /// KVM_HC_SEND_IPI (hypercall 10; Documentation/virt/kvm/x86/hypercalls.rst): a fixed,
    /// NMI, INIT or STARTUP message, physical destination without shorthand (`icr`'s low
    /// half), to the APIC IDs `minID + i` for each bit i of `low` and `minID + 64 + i` of
    /// `high`. Returns how many APICs accepted it, or -EINVAL (−22) for a logical
    /// destination or a shorthand, as KVM does.
    public func sendPVIPI(from source: Int, low: UInt64, high: UInt64, minID: UInt32, icr: UInt64) -> UInt64 {
        let low32 = UInt32(truncatingIfNeeded: icr)
        guard low32 & 0xC_0800 == 0 else { return UInt64(bitPattern: -22) }
        var delivered: UInt64 = 0
        for (bitmap, first) in [(low, UInt64(minID)), (high, UInt64(minID) + 64)] where first < UInt64(apics.count) {
            for bit in 0..<64 where bitmap & (1 << UInt64(bit)) != 0 {
                let (id, overflow) = first.addingReportingOverflow(UInt64(bit))
                guard !overflow, id < UInt64(apics.count) else { break }
                if deliver(to: Int(id), low: low32) { delivered += 1 }
            }
        }
        return delivered
    }

    /// One IPI message to APIC `target`: whether it was accepted (a fixed interrupt is not by
    /// a software-disabled APIC).
    @discardableResult
    private func deliver(to target: Int, low: UInt32) -> Bool {
        let vector = UInt8(low & 0xFF)
        switch (low >> 8) & 7 {
        case 0, 1: return accept(vcpu: target, vector: vector)  // fixed, lowest priority
        case 4: wiring.deliver(target, 2)  // NMI
        case 5:
            if low & 0x4000 != 0 || low & 0x8000 == 0 { wiring.initCPU(target) }  // INIT (assert), not the level de-assert
        case 6: wiring.startup(target, vector)
        default: return false
        }
        return true
    }

    // MARK: Snapshot

    /// One local APIC as a snapshot keeps it. The count's progress is kept as the time
    /// elapsed since it started on the timers' clock (the vCPU's TSC, or host time, which
    /// does not carry over to the restoring process).
    public struct SavedUnit: Codable, Sendable, Equatable {
        fileprivate var base: UInt64
        /// Absent in snapshots from before the ID was writable: the vCPU's index.
        fileprivate var xapicID: UInt32?
        fileprivate var tpr, ldr, dfr, svr, esr, icrHigh: UInt32
        fileprivate var lvt, isr, irr, tmr: [UInt32]
        fileprivate var initialCount, divide: UInt32
        fileprivate var countElapsedNanoseconds: UInt64
        fileprivate var countStopped: Bool
        /// The armed TSC deadline (0: none).
        fileprivate var deadline: UInt64
    }

    /// Call with the vCPUs paused.
    public var savedState: [SavedUnit] {
        apics.indices.map { vcpu in
            let time = now(vcpu)
            return apics[vcpu].state.withLock { r in
                SavedUnit(base: r.base, xapicID: r.xapicID, tpr: r.tpr, ldr: r.ldr, dfr: r.dfr, svr: r.svr, esr: r.esr, icrHigh: r.icrHigh,
                          lvt: r.lvt, isr: r.isr, irr: r.irr, tmr: r.tmr, initialCount: r.initialCount, divide: r.divide,
                          countElapsedNanoseconds: time &- r.countStart, countStopped: r.countStopped, deadline: r.deadline)
            }
        }
    }

    /// Restores `savedState` into a bank of as many APICs, before the vCPUs run. `timeStampCounters[i]`
    /// is vCPU i's restored TSC, against which a TSC deadline is armed again; the count goes on
    /// from where it was; requested interrupts (IRR) are offered to the vCPUs again.
    public func restore(_ saved: [SavedUnit], timeStampCounters: [UInt64]) throws(DeviceStateError) {
        guard saved.count == apics.count, timeStampCounters.count == apics.count else {
            throw DeviceStateError(device: "local-apic", "\(saved.count) saved APICs for \(apics.count) vCPUs")
        }
        for u in saved where u.lvt.count != 7 || u.isr.count != 8 || u.irr.count != 8 || u.tmr.count != 8 {
            throw DeviceStateError(device: "local-apic", "\(u.lvt.count) LVT entries, \(u.isr.count)/\(u.irr.count)/\(u.tmr.count) ISR/IRR/TMR words")
        }
        for (vcpu, u) in saved.enumerated() {
            let time = now(vcpu)
            let requested = apics[vcpu].state.withLock { r -> [UInt8] in
                cancelTimer(vcpu: vcpu, &r)
                r.base = u.base; r.xapicID = (u.xapicID ?? UInt32(vcpu)) & 0xFF; r.tpr = u.tpr; r.ldr = u.ldr; r.dfr = u.dfr; r.svr = u.svr; r.esr = u.esr
                r.icrHigh = u.icrHigh; r.lvt = u.lvt; r.isr = u.isr; r.irr = u.irr; r.tmr = u.tmr
                r.initialCount = u.initialCount; r.divide = u.divide
                r.countStart = time &- u.countElapsedNanoseconds
                r.countStopped = u.countStopped
                r.deadline = Self.timerMode(r) == 2 ? u.deadline : 0
                if r.deadline != 0 {
                    let tsc = timeStampCounters[vcpu]
                    schedule(vcpu: vcpu, &r, now: tsc, after: r.deadline > tsc ? r.deadline - tsc : 0, repeating: nil)
                } else {
                    rearm(vcpu: vcpu, &r, now: time)
                }
                return (16..<256).filter { r.irr[$0 >> 5] & (1 << UInt32($0 & 31)) != 0 }.map { UInt8($0) }
            }
            for vector in requested { wiring.deliver(vcpu, vector) }
        }
        updateExternalInterrupt()
    }

    // MARK: Timer

    private static func divisor(_ r: Registers) -> UInt64 {
        let code = ((r.divide >> 1) & 4) | (r.divide & 3)
        return code == 7 ? 1 : UInt64(2) << UInt64(code)
    }

    private static func timerMode(_ r: Registers) -> UInt32 { (r.lvt[0] >> 17) & 3 }

    private static func currentCount(_ r: Registers, now: UInt64) -> UInt32 {
        guard r.initialCount != 0, !r.countStopped, timerMode(r) != 2 else { return 0 }
        let ticks = (now &- r.countStart) / divisor(r)  // 1 GHz: one tick per nanosecond
        let initial = UInt64(r.initialCount)
        if timerMode(r) == 1 { return UInt32(initial - ticks % initial) }
        return ticks >= initial ? 0 : UInt32(initial - ticks)
    }

    /// A write of the LVT timer entry. Between one-shot and periodic the count goes on
    /// from where it is (periodic → one-shot: the current period is the one-shot's; an
    /// expired one-shot made periodic stays at 0); into or out of TSC-deadline mode the
    /// timer stops and the count and deadline clear.
    private func changeTimerMode(vcpu: Int, _ r: inout Registers, lvt: UInt32) {
        let old = Self.timerMode(r), new = (lvt >> 17) & 3
        r.lvt[0] = lvt
        guard old != new else { return }
        guard old != 2 && new != 2 else {
            r.initialCount = 0; r.deadline = 0; r.countStopped = false
            cancelTimer(vcpu: vcpu, &r)
            return
        }
        guard r.initialCount != 0, !r.countStopped else { return }
        let time = now(vcpu)
        let period = UInt64(r.initialCount) * Self.divisor(r)
        let elapsed = time &- r.countStart
        if old == 1 {
            r.countStart &+= elapsed - elapsed % period
        } else if elapsed >= period {
            r.countStopped = true
        }
        rearm(vcpu: vcpu, &r, now: time)
    }

    /// Schedules the next expiry of the count (none when it is stopped or has expired).
    private func rearm(vcpu: Int, _ r: inout Registers, now: UInt64) {
        cancelTimer(vcpu: vcpu, &r)
        guard Self.timerMode(r) != 2, r.initialCount != 0, !r.countStopped else { return }
        let period = UInt64(r.initialCount) * Self.divisor(r)
        let elapsed = now &- r.countStart
        if Self.timerMode(r) == 1 {
            schedule(vcpu: vcpu, &r, now: now, after: period - elapsed % period, repeating: period)
        } else if elapsed < period {
            schedule(vcpu: vcpu, &r, now: now, after: period - elapsed, repeating: nil)
        }
    }

    private func cancelTimer(vcpu: Int, _ r: inout Registers) {
        r.timer?.cancel()
        r.timer = nil
        r.timerGeneration &+= 1
        wiring.guestClock?.arm(vcpu, nil)
    }

    /// The timers' clock for APIC `vcpu` now.
    private func now(_ vcpu: Int) -> UInt64 { wiring.guestClock?.now(vcpu) ?? monotonicNanoseconds() }

    private func startCount(vcpu: Int, _ count: UInt32) {
        apics[vcpu].state.withLock { r in
            guard Self.timerMode(r) != 2 else { return }  // ignored in TSC-deadline mode
            r.initialCount = count
            r.countStopped = false
            r.countStart = now(vcpu)
            rearm(vcpu: vcpu, &r, now: r.countStart)
        }
    }

    private func armDeadline(vcpu: Int, deadline: UInt64, tsc: UInt64) {
        apics[vcpu].state.withLock { r in
            guard (r.lvt[0] >> 17) & 3 == 2 else { return }
            cancelTimer(vcpu: vcpu, &r)
            r.deadline = deadline
            guard deadline != 0 else { return }
            schedule(vcpu: vcpu, &r, now: tsc, after: deadline > tsc ? deadline - tsc : 0, repeating: nil)
        }
    }

    /// Arms the next expiry `delay` ticks after `now`: on the vCPU's clock (a periodic count
    /// re-armed at each expiry), or as a dispatch timer.
    private func schedule(vcpu: Int, _ r: inout Registers, now: UInt64, after delay: UInt64, repeating: UInt64?) {
        if let clock = wiring.guestClock {
            clock.arm(vcpu, now &+ delay)
            return
        }
        let generation = r.timerGeneration
        let t = DispatchSource.makeTimerSource(queue: queue)
        if let period = repeating {
            t.schedule(deadline: .now() + .nanoseconds(Int(min(delay, UInt64(Int.max)))), repeating: .nanoseconds(Int(max(period, 1000))),
                       leeway: .microseconds(10))
        } else {
            t.schedule(deadline: .now() + .nanoseconds(Int(min(delay, UInt64(Int.max)))), leeway: .microseconds(10))
        }
        t.setEventHandler { [weak self] in self?.timerFired(vcpu: vcpu, generation: generation) }
        r.timer = t
        t.resume()
    }

    /// The vCPU's clock reached the armed expiry (guest clock only).
    public func timerDeadlineReached(vcpu: Int, tsc: UInt64) {
        guard vcpu < apics.count else { return }
        let vector = apics[vcpu].state.withLock { r -> UInt8? in
            switch Self.timerMode(r) {
            case 2: r.deadline = 0
            case 1: rearm(vcpu: vcpu, &r, now: tsc)
            default: break
            }
            guard r.lvt[0] & 0x1_0000 == 0 else { return nil }  // masked
            return UInt8(r.lvt[0] & 0xFF)
        }
        if let vector { accept(vcpu: vcpu, vector: vector) }
    }

    private func timerFired(vcpu: Int, generation: UInt64) {
        let vector = apics[vcpu].state.withLock { r -> UInt8? in
            guard r.timerGeneration == generation else { return nil }
            let mode = (r.lvt[0] >> 17) & 3
            if mode == 2 { r.deadline = 0 }
            if mode != 1 { r.timer = nil }
            guard r.lvt[0] & 0x1_0000 == 0 else { return nil }  // masked
            return UInt8(r.lvt[0] & 0xFF)
        }
        if let vector { accept(vcpu: vcpu, vector: vector) }
    }
}
