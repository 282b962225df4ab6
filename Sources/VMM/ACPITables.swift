import Devices
import VirtCore

/// The minimal ACPI a PC firmware leaves for a kernel that has no MP-table parser (Debian's
/// cloud kernel): RSDP → XSDT → FADT (→ FACS, DSDT) and MADT, all in the BIOS area the
/// e820 map reserves.
///
/// - MADT: one local APIC per vCPU (IDs 0…n-1), the I/O APIC with GSIs 0–23 (ISA IRQ n is
///   GSI n; the SCI, IRQ 9, level-triggered), LINT1 = NMI.
/// - FADT (revision 3): no SMI command port (always in ACPI mode), the PM1a event and
///   control blocks of `ACPIPowerManagement`, SCI on IRQ 9; no PM timer, no GPE blocks.
/// - DSDT: `Name (_S5, Package () {5, 5, 0, 0})`, so an S5 request (power off) writes
///   SLP_TYP = 5 with SLP_EN to PM1a_CNT; `\_SB.PCI0` (PNP0A03, bus 0, no _CRS: Linux then
///   uses its default windows) and `\_SB.RES0` (PNP0C02) whose _CRS reserves ECAM.
/// - MCFG: ECAM of segment 0, bus 0 (`PCPlatformPCI`).
enum ACPITables {
    static let rsdpAddress: UInt64 = 0xF_0000
    static let xsdtAddress: UInt64 = 0xF_0040
    static let fadtAddress: UInt64 = 0xF_0100
    static let facsAddress: UInt64 = 0xF_0200  // 64-byte aligned
    static let madtAddress: UInt64 = 0xF_0300
    static let dsdtAddress: UInt64 = 0xF_0600
    static let mcfgAddress: UInt64 = 0xF_0800
    static let sciIRQ: UInt8 = 9
    static let sleepTypeS5: UInt16 = 5

    static func le16(_ v: UInt16) -> [UInt8] { [UInt8(v & 0xFF), UInt8(v >> 8)] }
    static func le32(_ v: UInt32) -> [UInt8] { le16(UInt16(v & 0xFFFF)) + le16(UInt16(v >> 16)) }
    static func le64(_ v: UInt64) -> [UInt8] { le32(UInt32(v & 0xFFFF_FFFF)) + le32(UInt32(v >> 32)) }
    static func checksum(_ b: [UInt8]) -> UInt8 { 0 &- b.reduce(0, &+) }

    /// A system description table: the 36-byte header (length and checksum filled in) and `body`.
    static func table(_ signature: String, revision: UInt8, _ body: [UInt8]) -> [UInt8] {
        var t = Array(signature.utf8) + le32(UInt32(36 + body.count)) + [revision, 0]
        t += Array("SWIFTV".utf8) + Array("SWIFTVSR".utf8) + le32(1) + Array("SWFT".utf8) + le32(1)
        t += body
        t[9] = checksum(t)
        return t
    }

    static func madt(vcpuCount: Int, ioapicID: UInt8) -> [UInt8] {
        var body = le32(UInt32(LocalAPICBank.base)) + le32(1)  // PCAT_COMPAT: 8259s present (masked by the kernel)
        for cpu in 0..<vcpuCount { body += [0, 8, UInt8(cpu), UInt8(cpu)] + le32(1) }
        body += [1, 12, ioapicID, 0] + le32(UInt32(IOAPIC.base)) + le32(0)
        body += [2, 10, 0, sciIRQ] + le32(UInt32(sciIRQ)) + le16(0x000D)  // SCI: level, active high
        body += [4, 6, 0xFF] + le16(0) + [1]  // LINT1 of every processor: NMI
        return table("APIC", revision: 3, body)
    }

    static func fadt() -> [UInt8] {
        var f = [UInt8](repeating: 0, count: 244 - 36)
        func put(_ bytes: [UInt8], _ offset: Int) { for (k, b) in bytes.enumerated() { f[offset - 36 + k] = b } }
        put(le32(UInt32(facsAddress)), 36)
        put(le32(UInt32(dsdtAddress)), 40)
        put(le16(UInt16(sciIRQ)), 46)
        put(le32(UInt32(ACPIPowerManagement.eventBlock)), 56)
        put(le32(UInt32(ACPIPowerManagement.controlBlock)), 64)
        f[88 - 36] = 4  // PM1_EVT_LEN
        f[89 - 36] = 2  // PM1_CNT_LEN
        put(le16(101), 96)  // P_LVL2_LAT > 100: no C2
        put(le16(1001), 98)  // P_LVL3_LAT > 1000: no C3
        put(le16(0), 109)  // IAPC_BOOT_ARCH: no legacy devices promised (no 8042)
        put(le32(1 << 0 | 1 << 2 | 1 << 4 | 1 << 5 | 1 << 8), 112)  // WBINVD, PROC_C1, PWR_BUTTON, SLP_BUTTON, TMR_VAL_EXT
        put(le64(facsAddress), 132)  // X_FIRMWARE_CTRL
        put(le64(dsdtAddress), 140)  // X_DSDT
        return table("FACP", revision: 3, f)
    }

    static func facs() -> [UInt8] {
        var f = Array("FACS".utf8) + le32(64) + le32(0) + le32(0) + le32(0) + le32(0) + le64(0) + [2]
        f += [UInt8](repeating: 0, count: 64 - f.count)
        return f
    }

    static func dsdt() -> [UInt8] {
        // NameOp "_S5_" PackageOp PkgLength(8) NumElements(4) BytePrefix 5, BytePrefix 5, Zero, Zero
        let s5: [UInt8] = [0x08] + Array("_S5_".utf8) + [0x12, 0x08, 0x04, 0x0A, UInt8(sleepTypeS5), 0x0A, UInt8(sleepTypeS5), 0x00, 0x00]
        return table("DSDT", revision: 2, s5 + AML.scope("\\_SB_", AML.device("PCI0", AML.name("_HID", AML.eisaID(0x0A03)) + AML.name("_UID", [0x00]))
            + AML.device("RES0", AML.name("_HID", AML.eisaID(0x0C02)) + AML.name("_UID", [0x00])
                + AML.name("_CRS", AML.buffer(AML.memory32Fixed(base: UInt32(PCPlatformPCI.ecamBase), length: 1 << 20) + [0x79, 0x00])))))
    }

    /// MCFG: one ECAM allocation, segment 0, buses 0–0.
    static func mcfg() -> [UInt8] {
        table("MCFG", revision: 1, le64(0) + le64(PCPlatformPCI.ecamBase) + le16(0) + [0, 0] + le32(0))
    }

    /// The few AML encodings the DSDT needs (ACPI 6.5 §20).
    enum AML {
        /// PkgLength: one byte below 64, else two (low nibble, then the rest).
        static func package(_ body: [UInt8]) -> [UInt8] {
            if body.count + 1 < 64 { return [UInt8(body.count + 1)] + body }
            let n = body.count + 2
            return [0x40 | UInt8(n & 0xF), UInt8(n >> 4)] + body
        }
        static func name(_ seg: String, _ value: [UInt8]) -> [UInt8] { [0x08] + Array(seg.utf8) + value }
        static func scope(_ path: String, _ body: [UInt8]) -> [UInt8] { [0x10] + package(Array(path.utf8) + body) }
        static func device(_ seg: String, _ body: [UInt8]) -> [UInt8] { [0x5B, 0x82] + package(Array(seg.utf8) + body) }
        /// EisaId("PNPxxxx") as a DWordConst: "PNP" compressed (0x41D0), then the product number.
        static func eisaID(_ product: UInt16) -> [UInt8] { [0x0C, 0x41, 0xD0, UInt8(product >> 8), UInt8(product & 0xFF)] }
        static func buffer(_ bytes: [UInt8]) -> [UInt8] { [0x11] + package([0x0A, UInt8(bytes.count)] + bytes) }
        /// A Memory32Fixed resource descriptor, read-write.
        static func memory32Fixed(base: UInt32, length: UInt32) -> [UInt8] { [0x86, 0x09, 0x00, 0x01] + ACPITables.le32(base) + ACPITables.le32(length) }
    }

    static func write(into memory: GuestMemory, vcpuCount: Int, ioapicID: UInt8) throws {
        let xsdt = table("XSDT", revision: 1, le64(fadtAddress) + le64(madtAddress) + le64(mcfgAddress))
        var rsdp = Array("RSD PTR ".utf8) + [0] + Array("SWIFTV".utf8) + [2] + le32(0) + le32(36) + le64(xsdtAddress) + [0, 0, 0, 0]
        rsdp[8] = checksum(Array(rsdp[0..<20]))
        rsdp[32] = checksum(rsdp)
        let madt = madt(vcpuCount: vcpuCount, ioapicID: ioapicID)
        guard madtAddress + UInt64(madt.count) <= dsdtAddress else { throw LinuxBootError.doesNotFit("the MADT for \(vcpuCount) vCPUs") }
        try memory.write(rsdp, at: rsdpAddress)
        try memory.write(xsdt, at: xsdtAddress)
        try memory.write(fadt(), at: fadtAddress)
        try memory.write(facs(), at: facsAddress)
        try memory.write(madt, at: madtAddress)
        let dsdt = dsdt()
        guard dsdtAddress + UInt64(dsdt.count) <= mcfgAddress else { throw LinuxBootError.doesNotFit("the DSDT") }
        try memory.write(dsdt, at: dsdtAddress)
        try memory.write(mcfg(), at: mcfgAddress)
    }
}
