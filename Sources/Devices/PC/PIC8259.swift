import Synchronization
import VirtCore

/// The PC's cascaded 8259A pair: the master at 0x20–0x21 (IRQ 0–7), the slave at 0xA0–0xA1
/// (IRQ 8–15) on the master's IRQ 2, and the edge/level control registers (ELCR) at
/// 0x4D0–0x4D1. Each chip: the ICW1–ICW4 initialisation sequence (vector offset, cascade,
/// auto-EOI), the mask (OCW1), EOIs (OCW2: non-specific, specific, with rotation, set
/// priority, rotate in auto-EOI), OCW3 (read IRR or ISR, poll, special mask), rotating
/// priority, and edge- or level-triggered inputs (a level input requests again after its EOI
/// while still asserted). The master's INTR output goes to `connectOutput` (the boot CPU's
/// LINT0); the CPU's interrupt acknowledge (`acknowledge`) returns the vector — offset plus
/// line, the slave's when the master answers on IRQ 2 — or the spurious IRQ 7 (15) vector
/// when the request went away before it.
public final class PIC8259: Sendable {
    public var name: String { "8259-pic" }
    public static let masterPort: UInt16 = 0x20, slavePort: UInt16 = 0xA0, elcrPort: UInt16 = 0x4D0
    public static let cascadeLine = 2
    /// ELCR bits that can be set: IRQ 0, 1, 2, 8 and 13 are edge-triggered on a PC.
    static let elcrWritable: (master: UInt8, slave: UInt8) = (0xF8, 0xDE)

    /// One chip's registers.
    public struct Chip: Codable, Sendable, Equatable {
        fileprivate var irr: UInt8 = 0, isr: UInt8 = 0, imr: UInt8 = 0xFF
        /// The input levels (edges set IRR on an edge-triggered line).
        fileprivate var lines: UInt8 = 0
        fileprivate var elcr: UInt8 = 0
        fileprivate var vectorBase: UInt8
        /// 0: initialised; 1, 2, 3: ICW2, ICW3, ICW4 expected next.
        fileprivate var initStep = 0
        fileprivate var expectsICW4 = false, single = false
        fileprivate var autoEOI = false, rotateOnAutoEOI = false
        fileprivate var readISR = false, poll = false, specialMask = false
        /// The line with the lowest priority (7 after initialisation: IRQ 0 is the highest).
        fileprivate var lowestPriority: UInt8 = 7
        fileprivate init(vectorBase: UInt8) { self.vectorBase = vectorBase }

        /// How many places above the highest priority `line` stands (0: the highest).
        private func rank(_ line: Int) -> Int { (line - Int(lowestPriority) - 1) & 7 }

        /// The line of highest priority among `bits`.
        private func highest(_ bits: UInt8) -> Int? {
            guard bits != 0 else { return nil }
            return (0..<8).map { (Int(lowestPriority) + 1 + $0) & 7 }.first { bits & (1 << UInt8($0)) != 0 }
        }

        /// The requested line the chip presents now: unmasked and above every line in service
        /// (in special mask mode, the masked ones in service do not count).
        fileprivate var requested: Int? {
            guard let line = highest(irr & ~imr) else { return nil }
            let inService = specialMask ? isr & ~imr : isr
            if let serving = highest(inService), rank(serving) <= rank(line) { return nil }
            return line
        }

        fileprivate mutating func setLine(_ line: Int, _ level: Bool) {
            let bit = UInt8(1) << UInt8(line)
            if level {
                if elcr & bit != 0 || lines & bit == 0 { irr |= bit }
                lines |= bit
            } else {
                lines &= ~bit
                if elcr & bit != 0 { irr &= ~bit }
            }
        }

        /// The acknowledge of `line`: in service (or, with auto-EOI, done at once); an
        /// edge-triggered request is consumed, a level one stays while the line is asserted.
        fileprivate mutating func acknowledge(_ line: Int) {
            let bit = UInt8(1) << UInt8(line)
            if autoEOI {
                if rotateOnAutoEOI { lowestPriority = UInt8(line) }
            } else {
                isr |= bit
            }
            if elcr & bit == 0 { irr &= ~bit }
        }

        fileprivate mutating func writeCommand(_ v: UInt8) {
            if v & 0x10 != 0 {  // ICW1: start again (the ELCR and the input levels stay)
                let kept = (lines, elcr, vectorBase)
                self = Chip(vectorBase: kept.2)
                (lines, elcr) = (kept.0, kept.1)
                imr = 0
                irr = lines & elcr
                expectsICW4 = v & 1 != 0
                single = v & 2 != 0
                initStep = 1
            } else if v & 0x08 != 0 {  // OCW3
                if v & 0x04 != 0 { poll = true }
                if v & 0x02 != 0 { readISR = v & 1 != 0 }
                if v & 0x40 != 0 { specialMask = v & 0x20 != 0 }
            } else {  // OCW2
                let line = Int(v & 7)
                switch v >> 5 {
                case 0, 4: rotateOnAutoEOI = v >> 5 == 4
                case 1, 5:  // non-specific EOI (and rotate): the highest-priority line in service
                    guard let serving = highest(isr) else { return }
                    isr &= ~(1 << UInt8(serving))
                    if v >> 5 == 5 { lowestPriority = UInt8(serving) }
                case 3, 7:  // specific EOI (and rotate)
                    isr &= ~(1 << UInt8(line))
                    if v >> 5 == 7 { lowestPriority = UInt8(line) }
                case 6: lowestPriority = UInt8(line)  // set priority
                default: break
                }
            }
        }

        fileprivate mutating func writeData(_ v: UInt8) {
            switch initStep {
            case 1:
                vectorBase = v & 0xF8
                initStep = single ? (expectsICW4 ? 3 : 0) : 2
            case 2: initStep = expectsICW4 ? 3 : 0  // ICW3: the cascade wiring is fixed here
            case 3:
                autoEOI = v & 2 != 0
                initStep = 0
            default: imr = v  // OCW1
            }
        }

        fileprivate var isValid: Bool { (0...3).contains(initStep) && lowestPriority < 8 }
    }

    /// Both chips, and the master's INTR output as last reported.
    public struct SavedState: Codable, Sendable, Equatable {
        fileprivate var master = Chip(vectorBase: 0x08), slave = Chip(vectorBase: 0x70)
        fileprivate var output = false
    }

    private let state = Mutex(SavedState())
    private let output = LockedFunction<@Sendable (Bool) -> Void>()

    /// As a PC BIOS leaves the pair: vectors 0x08 and 0x70, every line masked.
    public init() {}

    /// Where the master's INTR output goes; set before the guest runs.
    public func connectOutput(_ line: @escaping @Sendable (Bool) -> Void) { output.set(line) }

    public var savedState: SavedState { state.withLock { $0 } }

    /// Restores `savedState` and drives the output as it was.
    public func restore(_ saved: SavedState) throws(DeviceStateError) {
        guard saved.master.isValid, saved.slave.isValid else { throw DeviceStateError(device: name, "initialisation step or priority out of range") }
        state.withLock { s in
            s = saved
            output.function?(s.output)
        }
    }

    /// The masks of a snapshot made when only the registers were modelled.
    public func restoreMasks(master: UInt8, slave: UInt8) {
        state.withLock { s in
            s.master.imr = master
            s.slave.imr = slave
            update(&s)
        }
    }

    /// ISA interrupt line `irq` (0–15) at `level`.
    public func setIRQ(_ irq: Int, _ level: Bool) {
        guard (0..<16).contains(irq), irq != Self.cascadeLine else { return }
        state.withLock { s in
            if irq < 8 { s.master.setLine(irq, level) } else { s.slave.setLine(irq - 8, level) }
            update(&s)
        }
    }

    /// The CPU's interrupt acknowledge: the vector of the highest-priority request, now in
    /// service; the spurious vector of IRQ 7 (IRQ 15 for the slave) when none is requested.
    public func acknowledge() -> UInt8 {
        state.withLock { s in
            defer { update(&s) }
            guard let line = s.master.requested else { return s.master.vectorBase | 7 }
            s.master.acknowledge(line)
            guard line == Self.cascadeLine, !s.master.single else { return s.master.vectorBase | UInt8(line) }
            guard let slaveLine = s.slave.requested else { return s.slave.vectorBase | 7 }
            s.slave.acknowledge(slaveLine)
            return s.slave.vectorBase | UInt8(slaveLine)
        }
    }

    /// The slave's output is the master's IRQ 2 (followed as a level); the master's is INTR.
    private func update(_ s: inout SavedState) {
        let bit = UInt8(1) << UInt8(Self.cascadeLine)
        if s.slave.requested != nil { s.master.irr |= bit; s.master.lines |= bit } else { s.master.irr &= ~bit; s.master.lines &= ~bit }
        let asserted = s.master.requested != nil
        guard asserted != s.output else { return }
        s.output = asserted
        output.function?(asserted)  // under the lock: outputs reach the APIC in order
    }

    // MARK: Ports

    private func read(slave: Bool, offset: UInt16) -> UInt8 {
        state.withLock { s in
            defer { update(&s) }
            var chip = slave ? s.slave : s.master
            defer { if slave { s.slave = chip } else { s.master = chip } }
            if chip.poll {  // the poll command: this read acknowledges
                chip.poll = false
                guard let line = chip.requested else { return 0 }
                chip.acknowledge(line)
                return 0x80 | UInt8(line)
            }
            if offset == 1 { return chip.imr }
            return chip.readISR ? chip.isr : chip.irr
        }
    }

    private func write(slave: Bool, offset: UInt16, _ v: UInt8) {
        state.withLock { s in
            if offset == 0 {
                if slave { s.slave.writeCommand(v) } else { s.master.writeCommand(v) }
            } else {
                if slave { s.slave.writeData(v) } else { s.master.writeData(v) }
            }
            update(&s)
        }
    }

    /// One chip's two ports.
    public final class Ports: PortIODevice, Sendable {
        public var name: String { slave ? "8259-pic-slave" : "8259-pic-master" }
        private let pair: PIC8259
        private let slave: Bool
        fileprivate init(pair: PIC8259, slave: Bool) { self.pair = pair; self.slave = slave }
        public func portRead(offset: UInt16, size: UInt8) -> UInt32 { UInt32(pair.read(slave: slave, offset: offset & 1)) }
        public func portWrite(offset: UInt16, size: UInt8, value: UInt32) { pair.write(slave: slave, offset: offset & 1, UInt8(truncatingIfNeeded: value)) }
    }

    /// 0x4D0 (IRQ 0–7) and 0x4D1 (IRQ 8–15): a set bit makes the line level-triggered.
    public final class EdgeLevelControl: PortIODevice, Sendable {
        public var name: String { "8259-elcr" }
        private let pair: PIC8259
        fileprivate init(pair: PIC8259) { self.pair = pair }
        public func portRead(offset: UInt16, size: UInt8) -> UInt32 {
            pair.state.withLock { s in UInt32(offset == 0 ? s.master.elcr : s.slave.elcr) }
        }
        public func portWrite(offset: UInt16, size: UInt8, value: UInt32) {
            let v = UInt8(truncatingIfNeeded: value)
            pair.state.withLock { s in
                if offset == 0 { s.master.elcr = v & PIC8259.elcrWritable.master } else { s.slave.elcr = v & PIC8259.elcrWritable.slave }
                // A line now level-triggered requests while asserted.
                s.master.irr |= s.master.lines & s.master.elcr
                s.slave.irr |= s.slave.lines & s.slave.elcr
                pair.update(&s)
            }
        }
    }

    public var masterPorts: Ports { Ports(pair: self, slave: false) }
    public var slavePorts: Ports { Ports(pair: self, slave: true) }
    public var edgeLevelControl: EdgeLevelControl { EdgeLevelControl(pair: self) }
}
