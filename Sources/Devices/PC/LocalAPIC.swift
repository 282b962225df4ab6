import Dispatch
import Synchronization
import VirtCore

/// What a local APIC asks of the machine: deliver a vector to a vCPU, and the INIT and
/// STARTUP messages that start application processors.
public struct LocalAPICWiring: Sendable {
    public var deliver: @Sendable (_ vcpu: Int, _ vector: UInt8) -> Void
    public var initCPU: @Sendable (_ vcpu: Int) -> Void
    public var startup: @Sendable (_ vcpu: Int, _ vector: UInt8) -> Void
    public init(deliver: @escaping @Sendable (Int, UInt8) -> Void, initCPU: @escaping @Sendable (Int) -> Void,
                startup: @escaping @Sendable (Int, UInt8) -> Void) {
        self.deliver = deliver; self.initCPU = initCPU; self.startup = startup
    }
}

/// One local APIC per vCPU, in xAPIC form (the page at 0xFEE00000, which each vCPU sees
/// as its own) and x2APIC form (MSRs 0x800–0x8FF, through `PlatformMSRHandler`): ID,
/// version, TPR/PPR, EOI, LDR/DFR, SVR, ISR/TMR/IRR, ESR, ICR (fixed, NMI, INIT, STARTUP
/// with the destination shorthands, physical and flat logical destinations), the LVT and
/// the timer (one-shot, periodic, TSC-deadline) counting at 1 GHz, host time.
///
/// An accepted interrupt is requested (IRR) and handed to the vCPU at once; the engine
/// takes it once RFLAGS.IF is set and its priority class is above the processor priority
/// (TPR and the highest in-service vector), acknowledging it here (IRR → ISR). EOI and TPR
/// writes lower the priority, and the next one is taken.
public final class LocalAPICBank: PlatformMSRHandler, PlatformInterruptController, Sendable {
    public static let base: UInt64 = 0xFEE0_0000
    public static let tscDeadlineMSR: UInt32 = 0x6E0
    /// The timer's input clock (and the TSC rate the deadline mode assumes): 1 GHz.
    public static let timerHz: UInt64 = 1_000_000_000

    struct Registers {
        var tpr: UInt32 = 0, ldr: UInt32 = 0, dfr: UInt32 = 0xFFFF_FFFF, svr: UInt32 = 0xFF, esr: UInt32 = 0
        var icrHigh: UInt32 = 0
        var lvt = [UInt32](repeating: 0x1_0000, count: 7)  // timer, CMCI→thermal, perf, LINT0, LINT1, error (masked)
        var isr = [UInt32](repeating: 0, count: 8), irr = [UInt32](repeating: 0, count: 8), tmr = [UInt32](repeating: 0, count: 8)
        var initialCount: UInt32 = 0, divide: UInt32 = 0
        /// Host time the current count started from, and the TSC deadline armed (0: none).
        var countStart: UInt64 = 0
        var deadline: UInt64 = 0
        var timer: DispatchSourceTimer?
        var timerGeneration: UInt64 = 0
    }

    /// One APIC's registers behind its lock.
    private final class Unit: Sendable {
        let state = Mutex(Registers())
    }
    private let apics: [Unit]
    private let wiring: LocalAPICWiring
    private let queue = DispatchQueue(label: "swiftvisor.lapic-timer")
    /// The I/O APIC's EOI for level-triggered vectors (set once, before the guest runs).
    private let levelEOI = Mutex<(@Sendable (UInt8) -> Void)?>(nil)

    public func setLevelEOIHandler(_ handler: @escaping @Sendable (UInt8) -> Void) { levelEOI.withLock { $0 = handler } }
    public var count: Int { apics.count }

    public init(vcpuCount: Int, wiring: LocalAPICWiring) {
        apics = (0..<vcpuCount).map { _ in Unit() }
        self.wiring = wiring
    }

    deinit {
        for a in apics { a.state.withLock { $0.timer?.cancel() } }
    }

    // MARK: Register access

    /// xAPIC MMIO from vCPU `vcpu` at `offset` within the APIC page.
    public func mmioRead(vcpu: Int, offset: UInt64, size: UInt8) -> UInt64 {
        guard vcpu < apics.count, offset & 0xF == 0 else { return 0 }
        let index = Int(offset >> 4)
        if index == 0x02 { return UInt64(vcpu) << 24 }
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
        guard index >= 0x800, index <= 0x8FF, apicBase & Self.x2APICEnable != 0 else { return nil }
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
        guard index >= 0x800, index <= 0x8FF, apicBase & Self.x2APICEnable != 0 else { return false }
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
            case 0x39: return Self.currentCount(r, now: monotonicNanoseconds())
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
            apics[vcpu].state.withLock { r in
                let oldMode = (r.lvt[0] >> 17) & 3
                r.lvt[0] = value & 0x7_10FF
                if (value >> 17) & 3 != oldMode { r.initialCount = 0; r.deadline = 0; cancelTimer(&r) }
            }
        case 0x33...0x37: apics[vcpu].state.withLock { $0.lvt[index - 0x32] = value & 0x1_17FF }
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
    public func accept(vcpu: Int, vector: UInt8, level: Bool = false) {
        guard vcpu < apics.count, vector >= 16 else { return }
        let enabled = apics[vcpu].state.withLock { r -> Bool in
            guard r.svr & 0x100 != 0 else { return false }  // software-disabled APIC drops it
            r.irr[Int(vector >> 5)] |= 1 << UInt32(vector & 31)
            let bit: UInt32 = 1 << UInt32(vector & 31)
            if level { r.tmr[Int(vector >> 5)] |= bit } else { r.tmr[Int(vector >> 5)] &= ~bit }
            return true
        }
        if enabled { wiring.deliver(vcpu, vector) }
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
        if let v = levelVector, let eoi = levelEOI.withLock({ $0 }) { eoi(v) }
    }

    /// The I/O APIC routes `vector` to these APICs with this trigger mode (their TMR bit
    /// follows the routing, as KVM keeps it, before any interrupt arrives).
    public func setTriggerMode(vector: UInt8, level: Bool, logical: Bool, destination: UInt32) {
        guard vector >= 16 else { return }
        let bit: UInt32 = 1 << UInt32(vector & 31)
        for t in targets(source: 0, shorthand: 0, logical: logical, destination: destination, x2APIC: false) {
            apics[t].state.withLock { r in
                if level { r.tmr[Int(vector >> 5)] |= bit } else { r.tmr[Int(vector >> 5)] &= ~bit }
            }
        }
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
            if !logical { return Int(destination) < apics.count ? [Int(destination)] : [] }
            if x2APIC {
                let cluster = Int(destination >> 16), bits = destination & 0xFFFF
                return (0..<apics.count).filter { $0 >> 4 == cluster && bits & (1 << UInt32($0 & 15)) != 0 }
            }
            return (0..<apics.count).filter { id in
                let ldr = apics[id].state.withLock { $0.ldr } >> 24
                return ldr & destination != 0
            }
        }
    }

    private func sendIPI(from source: Int, low: UInt32, destination: UInt32, x2APIC: Bool) {
        let vector = UInt8(low & 0xFF)
        let mode = (low >> 8) & 7
        let logical = low & 0x800 != 0
        let shorthand = (low >> 18) & 3
        let targets = targets(source: source, shorthand: shorthand, logical: logical, destination: destination, x2APIC: x2APIC)
        for t in targets {
            switch mode {
            case 0, 1: accept(vcpu: t, vector: vector)  // fixed, lowest priority
            case 4: wiring.deliver(t, 2)  // NMI
            case 5:
                if low & 0x4000 != 0 || low & 0x8000 == 0 { wiring.initCPU(t) }  // INIT (assert), not the level de-assert
            case 6: wiring.startup(t, vector)
            default: break
            }
        }
    }

    // MARK: Timer

    private static func divisor(_ r: Registers) -> UInt64 {
        let code = ((r.divide >> 1) & 4) | (r.divide & 3)
        return code == 7 ? 1 : UInt64(2) << UInt64(code)
    }

    private static func currentCount(_ r: Registers, now: UInt64) -> UInt32 {
        guard r.initialCount != 0, (r.lvt[0] >> 17) & 3 != 2 else { return 0 }
        let ticks = (now &- r.countStart) / divisor(r)  // 1 GHz: one tick per nanosecond
        let periodic = (r.lvt[0] >> 17) & 3 == 1
        let initial = UInt64(r.initialCount)
        if periodic { return UInt32(initial - ticks % initial) }
        return ticks >= initial ? 0 : UInt32(initial - ticks)
    }

    private func cancelTimer(_ r: inout Registers) {
        r.timer?.cancel()
        r.timer = nil
        r.timerGeneration &+= 1
    }

    private func startCount(vcpu: Int, _ count: UInt32) {
        apics[vcpu].state.withLock { r in
            guard (r.lvt[0] >> 17) & 3 != 2 else { return }  // ignored in TSC-deadline mode
            cancelTimer(&r)
            r.initialCount = count
            r.countStart = monotonicNanoseconds()
            guard count != 0 else { return }
            let period = UInt64(count) * Self.divisor(r)
            schedule(vcpu: vcpu, &r, afterNanoseconds: period, repeating: (r.lvt[0] >> 17) & 3 == 1 ? period : nil)
        }
    }

    private func armDeadline(vcpu: Int, deadline: UInt64, tsc: UInt64) {
        apics[vcpu].state.withLock { r in
            guard (r.lvt[0] >> 17) & 3 == 2 else { return }
            cancelTimer(&r)
            r.deadline = deadline
            guard deadline != 0 else { return }
            schedule(vcpu: vcpu, &r, afterNanoseconds: deadline > tsc ? deadline - tsc : 0, repeating: nil)
        }
    }

    private func schedule(vcpu: Int, _ r: inout Registers, afterNanoseconds delay: UInt64, repeating: UInt64?) {
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
