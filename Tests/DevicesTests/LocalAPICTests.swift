import Synchronization
import TestSupport
import Testing
import VirtCore
@testable import Devices

/// The local APICs and the I/O APIC as kvm-unit-tests' apic and ioapic tests see them,
/// exercised through their registers without a vCPU.
@Suite struct LocalAPICTests {
    /// What the APICs asked the machine to deliver: (vCPU, vector), in order.
    final class Deliveries: Sendable {
        let log = Mutex<[(Int, UInt8)]>([])
        var all: [(Int, UInt8)] { log.withLock { $0 } }
        func vectors(to vcpu: Int) -> [UInt8] { all.filter { $0.0 == vcpu }.map(\.1) }
    }

    func bank(_ vcpus: Int) -> (LocalAPICBank, Deliveries) {
        let d = Deliveries()
        let apic = LocalAPICBank(vcpuCount: vcpus, wiring: LocalAPICWiring(
            deliver: { vcpu, vector in d.log.withLock { $0.append((vcpu, vector)) } }, initCPU: { _ in }, startup: { _, _ in }))
        for v in 0..<vcpus { apic.mmioWrite(vcpu: v, offset: 0xF0, size: 4, value: 0x1FF) }  // SVR: software-enabled
        return (apic, d)
    }

    static let en: UInt64 = 1 << 11, extd: UInt64 = 1 << 10
    func setBase(_ apic: LocalAPICBank, _ vcpu: Int, _ value: UInt64) -> Bool {
        apic.writeMSR(vcpu: vcpu, index: 0x1B, value: value, tsc: 0, apicBase: 0)
    }

    /// SDM Vol. 3A §10.12.5: xAPIC → x2APIC, never back without disabling; disabled → xAPIC
    /// only; EXTD without EN is invalid. The xAPIC page answers only in xAPIC mode.
    @Test func apicBaseFollowsTheModeStateMachine() {
        let (apic, _) = bank(1)
        let base: UInt64 = 0xFEE0_0000 | 0x100
        #expect(apic.mmioOffset(vcpu: 0, address: 0xFEE0_0030) == 0x30)
        #expect(setBase(apic, 0, base | Self.en | Self.extd))
        #expect(apic.mmioOffset(vcpu: 0, address: 0xFEE0_0030) == nil)  // x2APIC: no page
        #expect(apic.readMSR(vcpu: 0, index: 0x802, tsc: 0, apicBase: 0) == 0)
        #expect(!setBase(apic, 0, base | Self.extd))           // invalid state
        #expect(!setBase(apic, 0, base | Self.en))             // x2APIC → xAPIC
        #expect(setBase(apic, 0, base))                        // → disabled
        #expect(apic.readMSR(vcpu: 0, index: 0x802, tsc: 0, apicBase: 0) == nil)
        #expect(!setBase(apic, 0, base | Self.en | Self.extd)) // disabled → x2APIC
        #expect(setBase(apic, 0, 0xFED4_0000 | 0x100 | Self.en))  // relocated xAPIC page
        #expect(apic.mmioOffset(vcpu: 0, address: 0xFEE0_0030) == nil)
        #expect(apic.mmioOffset(vcpu: 0, address: 0xFED4_0030) == 0x30)
        #expect(apic.readMSR(vcpu: 0, index: 0x1B, tsc: 0, apicBase: 0) == 0xFED4_0000 | 0x100 | Self.en)
    }

    /// CR8 is TPR[7:4] (SDM Vol. 3A §10.8.6.1).
    /// The xAPIC ID is writable; a physical IPI reaches every APIC whose current ID it names
    /// (two may share one: kvm-unit-tests' aliased-ID test), none at the old ID, and the
    /// x2APIC ID stays the vCPU's index. Snapshots keep the written ID.
    @Test func xapicIDIsWritableAndPhysicalIPIsFollowIt() throws {
        let (apic, d) = bank(3)
        #expect(apic.mmioRead(vcpu: 2, offset: 0x20, size: 4) == 2 << 24)
        apic.mmioWrite(vcpu: 1, offset: 0x20, size: 4, value: 0x07 << 24)
        apic.mmioWrite(vcpu: 2, offset: 0x20, size: 4, value: 0x07 << 24)
        #expect(apic.mmioRead(vcpu: 1, offset: 0x20, size: 4) == 0x07 << 24)
        func ipi(to id: UInt64, vector: UInt64) {
            apic.mmioWrite(vcpu: 0, offset: 0x310, size: 4, value: id << 24)
            apic.mmioWrite(vcpu: 0, offset: 0x300, size: 4, value: vector)  // fixed, physical
        }
        ipi(to: 7, vector: 0x41)
        ipi(to: 1, vector: 0x42)  // nobody has ID 1 any more
        #expect(d.vectors(to: 1) == [0x41] && d.vectors(to: 2) == [0x41] && d.vectors(to: 0).isEmpty)
        // Restored into a fresh bank, the IDs come back with the rest.
        let (copy, copied) = bank(3)
        try copy.restore(apic.savedState, timeStampCounters: [0, 0, 0])
        #expect(copy.mmioRead(vcpu: 2, offset: 0x20, size: 4) == 0x07 << 24)
        copy.mmioWrite(vcpu: 0, offset: 0x310, size: 4, value: 7 << 24)
        copy.mmioWrite(vcpu: 0, offset: 0x300, size: 4, value: 0x43)
        #expect(copied.vectors(to: 1).contains(0x43) && copied.vectors(to: 2).contains(0x43))
        // In x2APIC mode the ID is the index, whatever the xAPIC ID was; a reset (disable,
        // enable) brings the initial xAPIC ID back.
        #expect(setBase(apic, 1, 0xFEE0_0000 | Self.en | Self.extd))
        #expect(apic.readMSR(vcpu: 1, index: 0x802, tsc: 0, apicBase: 0) == 1)
        #expect(setBase(apic, 2, 0xFEE0_0000) && setBase(apic, 2, 0xFEE0_0000 | Self.en))
        #expect(apic.mmioRead(vcpu: 2, offset: 0x20, size: 4) == 2 << 24)
    }

    @Test func cr8IsTheTaskPriorityClass() {
        let (apic, _) = bank(1)
        apic.setTaskPriorityClass(vcpu: 0, 0xA)
        #expect(apic.mmioRead(vcpu: 0, offset: 0x80, size: 4) == 0xA0)
        apic.mmioWrite(vcpu: 0, offset: 0x80, size: 4, value: 0x35)
        #expect(apic.taskPriorityClass(vcpu: 0) == 3)
    }

    /// Logical destinations: flat and cluster LDR models in xAPIC mode; in x2APIC mode the
    /// logical ID derived from the APIC ID, which an I/O APIC's 8-bit destination addresses
    /// as cluster 0.
    @Test func logicalDestinationsMatchEachAPICsModel() {
        let (apic, d) = bank(4)
        // Flat: LDR bit per CPU.
        for v in 0..<4 { apic.mmioWrite(vcpu: v, offset: 0xD0, size: 4, value: UInt64(1 << v) << 24) }
        apic.mmioWrite(vcpu: 0, offset: 0x310, size: 4, value: 0)
        apic.mmioWrite(vcpu: 0, offset: 0x300, size: 4, value: 0x800 | 0x41 | 0)  // logical, vector 0x41
        #expect(d.all.isEmpty)  // destination 0 names nobody
        apic.mmioWrite(vcpu: 0, offset: 0x310, size: 4, value: 0x0A << 24)
        apic.mmioWrite(vcpu: 0, offset: 0x300, size: 4, value: 0x800 | 0x41)
        #expect(d.all.map(\.0).sorted() == [1, 3])
        // Cluster model on CPU 2: cluster 5, member bit 2.
        apic.mmioWrite(vcpu: 2, offset: 0xE0, size: 4, value: 0x0FFF_FFFF)
        apic.mmioWrite(vcpu: 2, offset: 0xD0, size: 4, value: 0x54 << 24)
        d.log.withLock { $0.removeAll() }
        apic.mmioWrite(vcpu: 0, offset: 0x310, size: 4, value: 0x54 << 24)
        apic.mmioWrite(vcpu: 0, offset: 0x300, size: 4, value: 0x800 | 0x42)
        #expect(d.all.map(\.0) == [2])
        // x2APIC mode everywhere: the I/O APIC's destination 0xD names APIC IDs 0, 2 and 3.
        for v in 0..<4 { #expect(setBase(apic, v, 0xFEE0_0000 | Self.en | Self.extd)) }
        d.log.withLock { $0.removeAll() }
        apic.deliverMessage(vector: 0x86, mode: 0, logical: true, destination: 0xD, level: true)
        #expect(d.all.map(\.0).sorted() == [0, 2, 3])
    }

    /// TMR bits follow the interrupts accepted (set for level, cleared for edge), not the
    /// I/O APIC's redirection entries (SDM Vol. 3A §10.8.4).
    @Test func triggerModeRegisterFollowsAcceptedInterrupts() {
        let (apic, _) = bank(1)
        let ioapic = IOAPIC(apics: apic)
        func tmr79() -> Bool { apic.mmioRead(vcpu: 0, offset: 0x180 + 0x30, size: 4) & (1 << (0x79 & 31)) != 0 }
        func route(level: Bool) {
            ioapic.mmioWrite(offset: 0, size: 4, value: 0x10 + 2 * 0xE)
            ioapic.mmioWrite(offset: 0x10, size: 4, value: 0x79 | (level ? 1 << 15 : 0))
            ioapic.mmioWrite(offset: 0, size: 4, value: 0x11 + 2 * 0xE)
            ioapic.mmioWrite(offset: 0x10, size: 4, value: 0)
        }
        route(level: true)
        #expect(!tmr79())
        ioapic.setLine(0xE, true)
        #expect(tmr79())
        apic.acknowledge(vcpu: 0, vector: 0x79)
        ioapic.setLine(0xE, false)
        apic.mmioWrite(vcpu: 0, offset: 0xB0, size: 4, value: 0)  // EOI
        route(level: false)
        #expect(tmr79())  // still set: nothing edge-triggered accepted yet
        ioapic.setLine(0xE, true)
        #expect(!tmr79())
    }

    /// Changing the timer between one-shot and periodic keeps the initial count and the
    /// count in progress; an expired one-shot made periodic stays at 0.
    @Test func timerModeChangesKeepTheCount() {
        let (apic, _) = bank(1)
        func current() -> UInt64 { apic.mmioRead(vcpu: 0, offset: 0x390, size: 4) }
        apic.mmioWrite(vcpu: 0, offset: 0x3E0, size: 4, value: 0xB)  // divide by 1
        apic.mmioWrite(vcpu: 0, offset: 0x320, size: 4, value: 0x1_00EE)  // one-shot, masked
        let count: UInt64 = 20_000_000  // 20 ms at 1 GHz
        apic.mmioWrite(vcpu: 0, offset: 0x380, size: 4, value: count)
        apic.mmioWrite(vcpu: 0, offset: 0x320, size: 4, value: 0x1_00EE | 1 << 17)  // periodic
        #expect(apic.mmioRead(vcpu: 0, offset: 0x380, size: 4) == count)
        #expect(current() > 0 && current() <= count)
        apic.mmioWrite(vcpu: 0, offset: 0x320, size: 4, value: 0x1_00EE)  // one-shot again
        #expect(waitUntil(seconds: 10) { current() == 0 })
        apic.mmioWrite(vcpu: 0, offset: 0x320, size: 4, value: 0x1_00EE | 1 << 17)
        #expect(current() == 0)
    }

    /// KVM_HC_SEND_IPI: the bitmap names APIC IDs from `minID`; the count of APICs that
    /// accepted it comes back; IDs past the last APIC are ignored (apic.c's case: none); a
    /// logical destination or a shorthand is -EINVAL.
    @Test func pvSendIPIFollowsTheBitmap() {
        let (apic, d) = bank(4)
        #expect(apic.sendPVIPI(from: 0, low: 0b1010, high: 0, minID: 0, icr: 0x4031) == 2)
        #expect(d.vectors(to: 1) == [0x31] && d.vectors(to: 3) == [0x31] && d.vectors(to: 0).isEmpty)
        #expect(apic.sendPVIPI(from: 0, low: 0b11, high: 0, minID: 2, icr: 0x4032) == 2)
        #expect(d.vectors(to: 2) == [0x32] && d.vectors(to: 3) == [0x31, 0x32])
        #expect(apic.sendPVIPI(from: 0, low: 0xFFFF_FFFF, high: 0, minID: 0xFFFF_FFFF, icr: 0) == 0)
        #expect(apic.sendPVIPI(from: 0, low: 1, high: 0, minID: 0, icr: 0x4831) == UInt64(bitPattern: -22))
        #expect(apic.sendPVIPI(from: 0, low: 1, high: 0, minID: 0, icr: 0x8_4031) == UInt64(bitPattern: -22))
        #expect(apic.sendPVIPI(from: 0, low: 1, high: 0, minID: 0, icr: 0x4400) == 1)  // NMI
        #expect(d.vectors(to: 0) == [2])
    }

    /// Without x2APIC (QEMU's -cpu ...,-x2apic) IA32_APIC_BASE.EXTD is a #GP.
    @Test func x2APICCanBeHidden() {
        let apic = LocalAPICBank(vcpuCount: 1, x2APIC: false, wiring: LocalAPICWiring(deliver: { _, _ in }, initCPU: { _ in }, startup: { _, _ in }))
        let base: UInt64 = 0xFEE0_0000 | 0x100
        #expect(!apic.x2APICAvailable)
        #expect(!setBase(apic, 0, base | Self.en | Self.extd))
        #expect(setBase(apic, 0, base))
        #expect(setBase(apic, 0, base | Self.en))
        #expect(apic.readMSR(vcpu: 0, index: 0x802, tsc: 0, apicBase: 0) == nil)
    }

    /// With a guest clock the timers count its ticks and arm its deadlines; the expiry the
    /// vCPU reports delivers the vector and, periodic, arms the next period.
    @Test func timerCountsOnTheGuestClock() {
        final class Clock: Sendable {
            let now = Mutex<UInt64>(0)
            let armed = Mutex<UInt64?>(nil)
        }
        let clock = Clock(), d = Deliveries()
        let apic = LocalAPICBank(vcpuCount: 1, wiring: LocalAPICWiring(
            deliver: { vcpu, vector in d.log.withLock { $0.append((vcpu, vector)) } }, initCPU: { _ in }, startup: { _, _ in },
            guestClock: LocalAPICGuestClock(now: { _ in clock.now.withLock { $0 } }, arm: { _, t in clock.armed.withLock { $0 = t } })))
        apic.mmioWrite(vcpu: 0, offset: 0xF0, size: 4, value: 0x1FF)
        func at(_ t: UInt64) { clock.now.withLock { $0 = t } }
        func current() -> UInt64 { apic.mmioRead(vcpu: 0, offset: 0x390, size: 4) }
        at(1_000)
        apic.mmioWrite(vcpu: 0, offset: 0x3E0, size: 4, value: 0x0)  // divide by 2
        apic.mmioWrite(vcpu: 0, offset: 0x320, size: 4, value: 0xEE)  // one-shot
        apic.mmioWrite(vcpu: 0, offset: 0x380, size: 4, value: 500)
        #expect(clock.armed.withLock { $0 } == 2_000)
        at(1_400)
        #expect(current() == 300)
        at(2_000)
        apic.timerDeadlineReached(vcpu: 0, tsc: 2_000)
        #expect(d.vectors(to: 0) == [0xEE] && current() == 0)
        apic.mmioWrite(vcpu: 0, offset: 0x320, size: 4, value: 0xEF | 1 << 17)  // periodic (expired one-shot: stays at 0)
        apic.mmioWrite(vcpu: 0, offset: 0x380, size: 4, value: 500)
        #expect(clock.armed.withLock { $0 } == 3_000)
        at(3_000)
        apic.timerDeadlineReached(vcpu: 0, tsc: 3_000)
        #expect(clock.armed.withLock { $0 } == 4_000 && current() == 500)
        apic.mmioWrite(vcpu: 0, offset: 0x320, size: 4, value: 0xF0 | 2 << 17)  // TSC deadline: disarms
        #expect(clock.armed.withLock { $0 } == nil)
        #expect(apic.writeMSR(vcpu: 0, index: 0x6E0, value: 3_500, tsc: 3_000, apicBase: 0))
        #expect(clock.armed.withLock { $0 } == 3_500)
        apic.timerDeadlineReached(vcpu: 0, tsc: 3_500)
        #expect(d.vectors(to: 0) == [0xEE, 0xEF, 0xF0])
        #expect(apic.readMSR(vcpu: 0, index: 0x6E0, tsc: 3_500, apicBase: 0) == 0)
    }
}
