import Devices
import VirtCore

/// The PC platform's devices with state of their own, as `PCPlatform.install` made them:
/// what a snapshot or a migration saves, and what a restore gives back.
package final class PCPlatformDevices: Sendable {
    let linux: Bool
    let cpu: PCCPUFeatures
    let localAPICs: LocalAPICBank
    let ioapic: IOAPIC
    let pit: ProgrammableIntervalTimer
    let pic: PIC8259
    let cmos: CMOSClock?
    let powerManagement: ACPIPowerManagement?
    let startupGate: StartupGate
    /// COM1 when its interrupt is wired (Linux: IRQ 4 of the 8259 and the I/O APIC).
    let com1: UART16550?

    init(linux: Bool, cpu: PCCPUFeatures, localAPICs: LocalAPICBank, ioapic: IOAPIC, pit: ProgrammableIntervalTimer, pic: PIC8259,
         cmos: CMOSClock?, powerManagement: ACPIPowerManagement?, startupGate: StartupGate, com1: UART16550?) {
        self.linux = linux
        self.cpu = cpu
        self.localAPICs = localAPICs
        self.ioapic = ioapic
        self.pit = pit
        self.pic = pic
        self.cmos = cmos
        self.powerManagement = powerManagement
        self.startupGate = startupGate
        self.com1 = com1
    }

    /// The snapshot record's name.
    static let recordName = "pc"

    /// The platform's record: which platform to rebuild and each device's state.
    struct SavedState: Codable, Equatable {
        var linux: Bool
        var cpu: PCCPUFeatures
        var localAPICs: [LocalAPICBank.SavedUnit]
        var ioapic: IOAPIC.SavedState
        /// Absent in snapshots made before the platform had an 8254 (it then starts unprogrammed).
        var pit: ProgrammableIntervalTimer.SavedState?
        /// The 8259 pair; absent in snapshots made when only its registers were modelled
        /// (those kept each chip's mask in `masterPIC` and `slavePIC`, which restore the masks).
        var pic: PIC8259.SavedState?
        var masterPIC: PICRegistersBeforeDelivery?, slavePIC: PICRegistersBeforeDelivery?
        var cmos: CMOSClock.SavedState?
        var powerManagement: ACPIPowerManagement.SavedState?
    }

    /// One 8259's record in snapshots from before the pair delivered interrupts.
    struct PICRegistersBeforeDelivery: Codable, Equatable {
        var mask: UInt8
        var initStep: Int
        var readISR: Bool
    }

    /// Why this platform cannot be saved now, or nil. An application processor still waiting
    /// for its STARTUP IPI has no state of its own yet to save.
    var unsavableReason: String? {
        startupGate.allStarted ? nil
            : "an application processor has not been started yet (it waits for INIT and STARTUP); snapshot once the guest has brought up its CPUs"
    }

    /// Call with the vCPUs paused.
    var savedState: SavedState {
        SavedState(linux: linux, cpu: cpu, localAPICs: localAPICs.savedState, ioapic: ioapic.savedState, pit: pit.savedState,
                   pic: pic.savedState,
                   cmos: cmos?.savedState, powerManagement: powerManagement?.savedState)
    }

    /// Gives the devices of a freshly installed platform their saved states.
    func restore(_ saved: SavedState, timeStampCounters: [UInt64]) throws(DeviceStateError) {
        guard saved.linux == linux, (saved.cmos != nil) == (cmos != nil), (saved.powerManagement != nil) == (powerManagement != nil) else {
            throw DeviceStateError(device: "pc", "the saved platform's devices differ from this one's")
        }
        try ioapic.restore(saved.ioapic)
        if let p = saved.pit { try pit.restore(p) }
        com1?.resendInterruptLine()  // COM1's state came back before the platform did
        if let p = saved.pic {
            try pic.restore(p)
        } else if let master = saved.masterPIC, let slave = saved.slavePIC {
            pic.restoreMasks(master: master.mask, slave: slave.mask)
        } else {
            throw DeviceStateError(device: pic.name, "the snapshot keeps no 8259 state")
        }
        if let c = saved.cmos { try cmos?.restore(c) }
        if let p = saved.powerManagement { powerManagement?.restore(p) }
        // Last: a restored APIC may offer interrupts to the vCPUs at once.
        try localAPICs.restore(saved.localAPICs, timeStampCounters: timeStampCounters)
    }
}
