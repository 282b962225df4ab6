import Devices
import VirtCore

/// The Intel MultiProcessor Specification 1.4 tables a PC BIOS leaves for a kernel that
/// looks for them instead of (or before) ACPI, describing the same machine as the MADT:
///
/// - the floating pointer ("_MP_", 16 bytes, 16-byte aligned) in the BIOS area the e820
///   map reserves, after the ACPI tables; feature byte 2's IMCRP clear: virtual-wire mode
///   (the 8259's INTR reaches the boot CPU through its LINT0, no IMCR);
/// - the configuration table ("PCMP") right after it: one processor per vCPU (APIC IDs
///   0…n-1 as in the MADT, the boot CPU flagged), the PCI bus (0) and the ISA bus (1), the
///   I/O APIC (the MADT's ID and address), ISA IRQs 0–15 but the cascade (IRQ 2) on I/O APIC
///   pins of the same number — the platform wires IRQ n to pin n and the MADT has no
///   override, so there is no free pin 0 for the 8259: it reaches the CPU by LINT0 alone —
///   the SCI (IRQ 9) level-triggered, active high; the boot processor's LINT0 ExtINT, every
///   processor's LINT1 NMI.
enum MPTable {
    static let floatingPointerAddress: UInt64 = 0xF_0A00
    static let configurationAddress: UInt64 = 0xF_0A10
    /// The end of the room the configuration table may take.
    static let end: UInt64 = 0xF_1000
    static let pciBus: UInt8 = 0, isaBus: UInt8 = 1
    /// Entry types and interrupt types (MP spec tables 4-3, 4-11).
    enum Entry { static let processor: UInt8 = 0, bus: UInt8 = 1, ioapic: UInt8 = 2, ioInterrupt: UInt8 = 3, localInterrupt: UInt8 = 4 }
    enum InterruptType { static let int: UInt8 = 0, nmi: UInt8 = 1, extINT: UInt8 = 3 }
    /// The SCI's flags: active high (01), level-triggered (11 << 2).
    static let levelActiveHigh: UInt16 = 0x000D

    static func configurationTable(vcpuCount: Int, ioapicID: UInt8) -> [UInt8] {
        var entries: [UInt8] = []
        var count = 0
        func add(_ entry: [UInt8]) { entries += entry; count += 1 }
        for cpu in 0..<vcpuCount {
            // Local APIC version 0x14; enabled, the boot processor flagged; family 6; FPU and APIC features.
            add([Entry.processor, UInt8(cpu), 0x14, cpu == 0 ? 3 : 1] + ACPITables.le32(0x600) + ACPITables.le32(1 << 0 | 1 << 9)
                + [UInt8](repeating: 0, count: 8))
        }
        add([Entry.bus, pciBus] + Array("PCI   ".utf8))
        add([Entry.bus, isaBus] + Array("ISA   ".utf8))
        add([Entry.ioapic, ioapicID, 0x11, 1] + ACPITables.le32(UInt32(IOAPIC.base)))
        for irq in UInt8(0)..<16 where irq != UInt8(PIC8259.cascadeLine) {
            let flags = irq == ACPITables.sciIRQ ? levelActiveHigh : 0  // 0: as the ISA bus (edge, active high)
            add([Entry.ioInterrupt, InterruptType.int] + ACPITables.le16(flags) + [isaBus, irq, ioapicID, irq])
        }
        // The boot processor's LINT0 (the only one the 8259 drives); every processor's (0xFF) LINT1.
        add([Entry.localInterrupt, InterruptType.extINT] + ACPITables.le16(0) + [isaBus, 0, 0, 0])
        add([Entry.localInterrupt, InterruptType.nmi] + ACPITables.le16(0) + [isaBus, 0, 0xFF, 1])
        var table = Array("PCMP".utf8) + ACPITables.le16(UInt16(44 + entries.count)) + [4, 0]
        table += Array("SWIFTV  ".utf8) + Array("SWIFTVISOR  ".utf8)
        table += ACPITables.le32(0) + ACPITables.le16(0) + ACPITables.le16(UInt16(count)) + ACPITables.le32(UInt32(LocalAPICBank.base))
        table += ACPITables.le16(0) + [0, 0]  // no extended table
        table += entries
        table[7] = ACPITables.checksum(table)
        return table
    }

    static func floatingPointer() -> [UInt8] {
        var p = Array("_MP_".utf8) + ACPITables.le32(UInt32(configurationAddress)) + [1, 4, 0, 0, 0, 0, 0, 0]
        p[10] = ACPITables.checksum(p)
        return p
    }

    static func write(into memory: GuestMemory, vcpuCount: Int, ioapicID: UInt8) throws {
        let table = configurationTable(vcpuCount: vcpuCount, ioapicID: ioapicID)
        guard configurationAddress + UInt64(table.count) <= end else { throw LinuxBootError.doesNotFit("the MP table for \(vcpuCount) vCPUs") }
        try memory.write(floatingPointer(), at: floatingPointerAddress)
        try memory.write(table, at: configurationAddress)
    }
}
