import Synchronization
import TestSupport
import Testing
import VirtCore
@testable import Devices

/// The 8259A pair through its ports, as a kernel programs it: initialisation, masks,
/// priorities, the cascade, the EOI commands, ELCR level inputs, the acknowledge and the
/// spurious IRQ 7/15; and LINT0's ExtINT path through the boot CPU's local APIC.
@Suite struct PIC8259Tests {
    /// The master's INTR output levels, in order.
    final class Output: Sendable {
        let levels = Mutex<[Bool]>([])
        var current: Bool { levels.withLock { $0.last ?? false } }
    }

    struct Pair {
        let pic = PIC8259()
        let master: PIC8259.Ports, slave: PIC8259.Ports, elcr: PIC8259.EdgeLevelControl
        let output = Output()
        init() {
            master = pic.masterPorts
            slave = pic.slavePorts
            elcr = pic.edgeLevelControl
            pic.connectOutput { [output] level in output.levels.withLock { $0.append(level) } }
        }

        /// Linux's init_8259A: ICW1 (edge, cascade, ICW4), ICW2 offsets, ICW3 wiring, ICW4 (8086, `autoEOI`).
        func initialise(masterBase: UInt8 = 0x30, slaveBase: UInt8 = 0x38, autoEOI: Bool = false) {
            master.portWrite(offset: 0, size: 1, value: 0x11)
            master.portWrite(offset: 1, size: 1, value: UInt32(masterBase))
            master.portWrite(offset: 1, size: 1, value: 0x04)
            master.portWrite(offset: 1, size: 1, value: autoEOI ? 0x03 : 0x01)
            slave.portWrite(offset: 0, size: 1, value: 0x11)
            slave.portWrite(offset: 1, size: 1, value: UInt32(slaveBase))
            slave.portWrite(offset: 1, size: 1, value: 0x02)
            slave.portWrite(offset: 1, size: 1, value: 0x01)
        }
        func mask(master m: UInt8, slave s: UInt8) {
            master.portWrite(offset: 1, size: 1, value: UInt32(m))
            slave.portWrite(offset: 1, size: 1, value: UInt32(s))
        }
        func pulse(_ irq: Int) { pic.setIRQ(irq, true); pic.setIRQ(irq, false) }
        func readIRR(_ chip: PIC8259.Ports) -> UInt8 {
            chip.portWrite(offset: 0, size: 1, value: 0x0A)
            return UInt8(chip.portRead(offset: 0, size: 1))
        }
        func readISR(_ chip: PIC8259.Ports) -> UInt8 {
            chip.portWrite(offset: 0, size: 1, value: 0x0B)
            return UInt8(chip.portRead(offset: 0, size: 1))
        }
        func eoi(_ chip: PIC8259.Ports) { chip.portWrite(offset: 0, size: 1, value: 0x20) }
    }

    /// ICW1 unmasks the chip and starts the sequence; ICW2 sets the vector offset (its low 3
    /// bits ignored); once ICW4 is in, data writes are the mask again.
    @Test func initialisationSetsOffsetsAndMasks() {
        let p = Pair()
        #expect(p.master.portRead(offset: 1, size: 1) == 0xFF)  // as a BIOS leaves it
        p.initialise(masterBase: 0x37, slaveBase: 0x70)
        #expect(p.master.portRead(offset: 1, size: 1) == 0)
        p.mask(master: 0xFA, slave: 0xFF)  // IRQ 0 and the cascade unmasked
        #expect(p.master.portRead(offset: 1, size: 1) == 0xFA)
        p.pulse(0)
        #expect(p.output.current)
        #expect(p.pic.acknowledge() == 0x30)  // 0x37 & 0xF8, line 0
        #expect(!p.output.current)
    }

    /// A masked line is requested (IRR) but not presented; unmasking presents it. Edge
    /// requests are latched while masked.
    @Test func maskHoldsRequestsBack() {
        let p = Pair()
        p.initialise()
        p.mask(master: 0xFF, slave: 0xFF)
        p.pulse(4)
        #expect(p.readIRR(p.master) == 0x10)
        #expect(!p.output.current)
        p.mask(master: 0xEF, slave: 0xFF)
        #expect(p.output.current)
        #expect(p.pic.acknowledge() == 0x34)
        #expect(p.readISR(p.master) == 0x10)
        #expect(p.readIRR(p.master) == 0)
    }

    /// The lowest line wins; a line in service blocks itself and lower ones, not higher ones
    /// (fully nested); a non-specific EOI ends the highest in service.
    @Test func priorityAndNesting() {
        let p = Pair()
        p.initialise()
        p.pulse(5); p.pulse(3)
        #expect(p.pic.acknowledge() == 0x33)
        #expect(!p.output.current)  // 5 is below 3, in service
        p.pulse(1)
        #expect(p.output.current)  // 1 is above
        #expect(p.pic.acknowledge() == 0x31)
        #expect(p.readISR(p.master) == 0x0A)
        p.eoi(p.master)  // ends 1, the highest in service
        #expect(p.readISR(p.master) == 0x08)
        #expect(!p.output.current)
        p.eoi(p.master)  // ends 3: 5 comes through
        #expect(p.output.current)
        #expect(p.pic.acknowledge() == 0x35)
    }

    /// A slave line reaches the CPU through the master's IRQ 2 with the slave's vector; both
    /// chips hold it in service until both are ended; the mask of IRQ 2 holds the slave back.
    @Test func cascadeThroughIRQ2() {
        let p = Pair()
        p.initialise()
        p.mask(master: 0xFB, slave: 0x00)  // only the cascade on the master
        p.pulse(12)
        #expect(p.output.current)
        #expect(p.readIRR(p.master) == 0x04)
        #expect(p.pic.acknowledge() == 0x3C)
        #expect(p.readISR(p.master) == 0x04 && p.readISR(p.slave) == 0x10)
        p.pulse(9)  // above 12 on the slave, but the master's IRQ 2 is in service
        #expect(!p.output.current)
        p.eoi(p.slave); p.eoi(p.master)
        #expect(p.output.current)
        #expect(p.pic.acknowledge() == 0x39)
        p.eoi(p.slave); p.eoi(p.master)
        p.mask(master: 0xFF, slave: 0x00)
        p.pulse(10)
        #expect(!p.output.current)  // IRQ 2 masked on the master
    }

    /// Specific EOI ends the named line whatever its priority; rotate-on-EOI makes the ended
    /// line the lowest; set-priority makes the named line the lowest.
    @Test func specificAndRotatingEOI() {
        let p = Pair()
        p.initialise()
        p.pulse(6); p.pulse(1)
        #expect(p.pic.acknowledge() == 0x31)
        p.master.portWrite(offset: 0, size: 1, value: 0x60 | 1)  // specific EOI of 1
        #expect(p.pic.acknowledge() == 0x36)
        p.master.portWrite(offset: 0, size: 1, value: 0xA0)  // rotate on non-specific EOI: 6 lowest, 7 highest
        p.pulse(0); p.pulse(7)
        #expect(p.pic.acknowledge() == 0x37)
        p.master.portWrite(offset: 0, size: 1, value: 0xE0 | 7)  // rotate on specific EOI of 7: 0 highest again
        #expect(p.pic.acknowledge() == 0x30)
        p.eoi(p.master)
        p.master.portWrite(offset: 0, size: 1, value: 0xC0 | 3)  // set priority: 3 lowest, 4 highest
        p.pulse(2); p.pulse(5)
        #expect(p.pic.acknowledge() == 0x35)
    }

    /// Auto-EOI: the acknowledge leaves nothing in service, so the next request comes through.
    @Test func autoEOILeavesNothingInService() {
        let p = Pair()
        p.initialise(autoEOI: true)
        p.pulse(3)
        #expect(p.pic.acknowledge() == 0x33)
        #expect(p.readISR(p.master) == 0)
        p.pulse(3)
        #expect(p.output.current)
    }

    /// A level-triggered line (ELCR) requests while asserted: after its EOI it is presented
    /// again, and dropping the line withdraws it. IRQ 0–2 cannot be made level.
    @Test func elcrLevelLinesRequestAgainAfterEOI() {
        let p = Pair()
        p.initialise()
        p.elcr.portWrite(offset: 1, size: 1, value: 0xFF)
        p.elcr.portWrite(offset: 0, size: 1, value: 0xFF)
        #expect(p.elcr.portRead(offset: 1, size: 1) == 0xDE && p.elcr.portRead(offset: 0, size: 1) == 0xF8)
        p.pic.setIRQ(11, true)
        #expect(p.pic.acknowledge() == 0x3B)
        #expect(!p.output.current)
        p.eoi(p.slave); p.eoi(p.master)
        #expect(p.output.current)  // still asserted: requested again
        #expect(p.pic.acknowledge() == 0x3B)
        p.eoi(p.slave); p.eoi(p.master)
        p.pic.setIRQ(11, false)
        #expect(!p.output.current)
        #expect(p.readIRR(p.slave) == 0)
        // Edge-triggered by contrast (IRQ 1 cannot be level): held high, one interrupt.
        p.pic.setIRQ(1, true)
        #expect(p.pic.acknowledge() == 0x31)
        p.eoi(p.master)
        #expect(!p.output.current)
    }

    /// A request withdrawn before the acknowledge gives the spurious vector of IRQ 7 (master)
    /// or IRQ 15 (slave, with the master's IRQ 2 in service), with nothing in service on
    /// the chip that had nothing.
    @Test func spuriousVectors() {
        let p = Pair()
        p.initialise()
        p.elcr.portWrite(offset: 0, size: 1, value: 0x20)  // IRQ 5 level
        p.pic.setIRQ(5, true)
        #expect(p.output.current)
        p.pic.setIRQ(5, false)
        #expect(p.pic.acknowledge() == 0x37)
        #expect(p.readISR(p.master) == 0)
        #expect(p.pic.acknowledge() == 0x37)  // nothing requested at all
    }

    /// OCW3's poll: the read acknowledges the highest request and returns 0x80 | line.
    @Test func pollAcknowledges() {
        let p = Pair()
        p.initialise()
        p.pulse(6)
        p.master.portWrite(offset: 0, size: 1, value: 0x0C)
        #expect(p.master.portRead(offset: 0, size: 1) == 0x86)
        #expect(p.readISR(p.master) == 0x40)
        p.master.portWrite(offset: 0, size: 1, value: 0x0C)
        #expect(p.master.portRead(offset: 0, size: 1) == 0)
    }

    /// The whole state survives a snapshot: masks, offsets, requests and lines in service.
    @Test func stateSurvivesRestore() throws {
        let p = Pair()
        p.initialise()
        p.mask(master: 0xF0, slave: 0x7F)
        p.pulse(1); p.pulse(3)
        _ = p.pic.acknowledge()
        let restored = Pair()
        try restored.pic.restore(p.pic.savedState)
        #expect(restored.master.portRead(offset: 1, size: 1) == 0xF0)
        #expect(restored.slave.portRead(offset: 1, size: 1) == 0x7F)
        #expect(restored.readISR(restored.master) == 0x02)
        #expect(restored.output.current == false)
        restored.eoi(restored.master)
        #expect(restored.output.current)
        #expect(restored.pic.acknowledge() == 0x33)
    }

    // MARK: LINT0

    final class Requests: Sendable {
        let levels = Mutex<[(Int, Bool)]>([])
        var current: Bool { levels.withLock { $0.last?.1 ?? false } }
    }

    /// The boot CPU's LINT0 passes the 8259's INTR as ExtINT at reset (virtual wire) and
    /// when its LVT entry says ExtINT unmasked, not when masked; an APIC globally disabled
    /// passes it whatever LVT says; the acknowledge through the APIC is the 8259's.
    @Test func lint0PassesExtINTAsProgrammed() {
        let requests = Requests()
        let apic = LocalAPICBank(vcpuCount: 2, wiring: LocalAPICWiring(
            deliver: { _, _ in }, initCPU: { _ in }, startup: { _, _ in },
            externalInterrupt: { vcpu, level in requests.levels.withLock { $0.append((vcpu, level)) } }))
        let p = Pair()
        p.pic.connectOutput { [weak apic] level in apic?.setLINT0(level) }
        apic.connectExternalInterruptController { [pic = p.pic] in pic.acknowledge() }
        p.initialise()
        #expect(apic.mmioRead(vcpu: 0, offset: 0x350, size: 4) == 0x700)
        #expect(apic.mmioRead(vcpu: 1, offset: 0x350, size: 4) & 0x1_0000 != 0)  // an AP's LINT0: masked
        p.pulse(0)
        #expect(requests.current)
        #expect(requests.levels.withLock { $0.allSatisfy { $0.0 == 0 } })
        #expect(apic.acknowledgeExternalInterrupt(vcpu: 1) == nil)
        #expect(apic.acknowledgeExternalInterrupt(vcpu: 0) == 0x30)
        #expect(!requests.current)
        p.eoi(p.master)
        apic.mmioWrite(vcpu: 0, offset: 0x350, size: 4, value: 0x1_0700)  // masked
        p.pulse(1)
        #expect(!requests.current)
        #expect(apic.acknowledgeExternalInterrupt(vcpu: 0) == nil)
        apic.mmioWrite(vcpu: 0, offset: 0x350, size: 4, value: 0x0_0000)  // fixed, unmasked: not ExtINT
        #expect(!requests.current)
        #expect(apic.writeMSR(vcpu: 0, index: 0x1B, value: 0xFEE0_0000 | 0x100, tsc: 0, apicBase: 0))  // globally disabled
        #expect(requests.current)
        #expect(apic.acknowledgeExternalInterrupt(vcpu: 0) == 0x31)
    }
}
