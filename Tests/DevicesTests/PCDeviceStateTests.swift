import Synchronization
import TestSupport
import Testing
import VirtCore
@testable import Devices

/// The PC devices' saved states (what a snapshot or a migration of a PC-platform VM
/// carries): each restores into a fresh device that then behaves as the original did.
@Suite struct PCDeviceStateTests {
    final class Deliveries: Sendable {
        let log = Mutex<[(Int, UInt8)]>([])
        func vectors(to vcpu: Int) -> [UInt8] { log.withLock { $0.filter { $0.0 == vcpu }.map(\.1) } }
    }

    func bank(_ vcpus: Int) -> (LocalAPICBank, Deliveries) {
        let d = Deliveries()
        let apic = LocalAPICBank(vcpuCount: vcpus, wiring: LocalAPICWiring(
            deliver: { vcpu, vector in d.log.withLock { $0.append((vcpu, vector)) } }, initCPU: { _ in }, startup: { _, _ in }))
        return (apic, d)
    }

    /// Registers come back as they were; a requested interrupt (IRR) is offered to the vCPU
    /// again; the one-shot count goes on from where it stood instead of starting over.
    @Test func localAPICRegistersCountAndRequestsSurvive() throws {
        let (apic, _) = bank(1)
        apic.mmioWrite(vcpu: 0, offset: 0xF0, size: 4, value: 0x1FF)       // SVR: enabled, spurious 0xFF
        apic.mmioWrite(vcpu: 0, offset: 0x80, size: 4, value: 0x20)        // TPR
        apic.mmioWrite(vcpu: 0, offset: 0x350, size: 4, value: 0x0_0700)  // LINT0: ExtINT
        apic.mmioWrite(vcpu: 0, offset: 0x3E0, size: 4, value: 0xB)        // divide by 1
        apic.mmioWrite(vcpu: 0, offset: 0x320, size: 4, value: 0x30)       // timer: one-shot, vector 0x30
        apic.mmioWrite(vcpu: 0, offset: 0x380, size: 4, value: 0xFFFF_FFFF)  // ~4.3 s at 1 GHz
        apic.accept(vcpu: 0, vector: 0x41)
        let saved = apic.savedState

        let (restored, deliveries) = bank(1)
        try restored.restore(saved, timeStampCounters: [0])
        for offset: UInt64 in [0xF0, 0x80, 0x350, 0x3E0, 0x320, 0x380] {
            #expect(restored.mmioRead(vcpu: 0, offset: offset, size: 4) == apic.mmioRead(vcpu: 0, offset: offset, size: 4),
                    "register 0x\(String(offset, radix: 16))")
        }
        #expect(restored.mmioRead(vcpu: 0, offset: 0x220, size: 4) & 0x2 != 0, "IRR bit of 0x41 (word 2, bit 1)")
        #expect(deliveries.vectors(to: 0) == [0x41])
        let count = restored.mmioRead(vcpu: 0, offset: 0x390, size: 4)
        #expect(count > 0 && count < 0xFFFF_FFFF, "the count went on (\(count))")
    }

    /// A TSC deadline already passed by the restored TSC fires at once; the deadline is
    /// compared with the TSC the vCPU was restored with, not the host's clock.
    @Test func anArmedTSCDeadlineIsArmedAgain() throws {
        let (apic, _) = bank(1)
        apic.mmioWrite(vcpu: 0, offset: 0xF0, size: 4, value: 0x1FF)
        apic.mmioWrite(vcpu: 0, offset: 0x320, size: 4, value: 0x4_0031)  // TSC-deadline mode, vector 0x31
        #expect(apic.writeMSR(vcpu: 0, index: LocalAPICBank.tscDeadlineMSR, value: 5_000_000_000_000, tsc: 1_000, apicBase: 0))
        let saved = apic.savedState

        let (restored, deliveries) = bank(1)
        try restored.restore(saved, timeStampCounters: [5_000_000_000_001])
        #expect(waitUntil { deliveries.vectors(to: 0) == [0x31] })
    }

    @Test func aStateForAnotherNumberOfAPICsIsRefused() {
        let (two, _) = bank(2)
        let (one, _) = bank(1)
        #expect(throws: DeviceStateError.self) { try one.restore(two.savedState, timeStampCounters: [0]) }
    }

    /// Redirection entries (and their remote IRR) and IOREGSEL come back.
    @Test func ioapicEntriesSurvive() throws {
        let (apic, _) = bank(1)
        let ioapic = IOAPIC(apics: apic)
        ioapic.mmioWrite(offset: 0x00, size: 4, value: 0x18)  // pin 4, low half
        ioapic.mmioWrite(offset: 0x10, size: 4, value: 0x0_0034)
        ioapic.mmioWrite(offset: 0x00, size: 4, value: 0x19)  // high half: destination 1
        ioapic.mmioWrite(offset: 0x10, size: 4, value: 0x0100_0000)
        let restored = IOAPIC(apics: bank(1).0)
        try restored.restore(ioapic.savedState)
        #expect(restored.mmioRead(offset: 0x00, size: 4) == 0x19)
        #expect(restored.mmioRead(offset: 0x10, size: 4) == 0x0100_0000)
        restored.mmioWrite(offset: 0x00, size: 4, value: 0x18)
        #expect(restored.mmioRead(offset: 0x10, size: 4) == 0x34)
    }

    @Test func cmosRAMAndIndexSurvive() throws {
        let cmos = CMOSClock(now: { 0 })
        cmos.portWrite(offset: 0, size: 1, value: 0x40)
        cmos.portWrite(offset: 1, size: 1, value: 0x5A)
        let restored = CMOSClock(now: { 0 })
        try restored.restore(cmos.savedState)
        #expect(restored.portRead(offset: 1, size: 1) == 0x5A)
    }

    @Test func picMaskSurvives() throws {
        let pic = PIC8259()
        pic.masterPorts.portWrite(offset: 1, size: 1, value: 0xFB)
        let restored = PIC8259()
        try restored.restore(pic.savedState)
        #expect(restored.masterPorts.portRead(offset: 1, size: 1) == 0xFB)
    }
}
