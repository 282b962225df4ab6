import Devices
import Synchronization
import TestSupport
import Testing
import VirtCore
@testable import VMM

/// The Linux x86 boot protocol loader: a synthetic bzImage (a real setup header with a
/// small protected-mode part) and vmlinux ELF, the zero page it writes, the 64-bit entry
/// state, the MP table, and damaged headers that must give one typed error each.
@Suite struct LinuxBootLoaderTests {
    static let ramSize: UInt64 = 64 << 20

    /// A bzImage with four setup sectors, boot protocol 2.15 and `payload` as its
    /// protected-mode part (the compressed payload is said to be all of it).
    static func bzImage(payload: [UInt8], initSize: UInt32 = 0x40_0000, preferred: UInt64 = 0x100_0000) -> [UInt8] {
        var b = [UInt8](repeating: 0, count: 5 * 512)
        func put(_ v: UInt64, _ at: Int, _ width: Int) { for i in 0..<width { b[at + i] = UInt8(truncatingIfNeeded: v >> (8 * UInt64(i))) } }
        put(4, 0x1F1, 1)  // setup_sects
        put(0xAA55, 0x1FE, 2)
        put(0x66, 0x201, 1)  // the jump over the header: it ends at 0x268
        put(0x5372_6448, 0x202, 4)  // "HdrS"
        put(0x020F, 0x206, 2)
        put(1, 0x211, 1)  // LOADED_HIGH
        put(0x10_0000, 0x214, 4)
        put(0x7FFF_FFFF, 0x22C, 4)
        put(0x20_0000, 0x230, 4)
        put(1, 0x234, 1)
        put(0x7F, 0x236, 2)
        put(0x7FF, 0x238, 4)
        put(0, 0x248, 4)
        put(UInt64(payload.count), 0x24C, 4)
        put(preferred, 0x258, 8)
        put(UInt64(initSize), 0x260, 4)
        return b + payload
    }

    /// A vmlinux-like ELF64: one segment linked at 0xFFFFFFFF81000000, loaded at 16 MiB.
    static func vmlinux(code: [UInt8]) -> [UInt8] {
        var b = [UInt8](repeating: 0, count: 0x1000)
        func put(_ v: UInt64, _ at: Int, _ width: Int) { for i in 0..<width { b[at + i] = UInt8(truncatingIfNeeded: v >> (8 * UInt64(i))) } }
        b[0] = 0x7F; b[1] = 0x45; b[2] = 0x4C; b[3] = 0x46; b[4] = 2; b[5] = 1; b[6] = 1
        put(2, 16, 2); put(62, 18, 2); put(1, 20, 4)
        put(0xFFFF_FFFF_8100_0010, 24, 8)  // e_entry: virtual, 0x10 into the segment
        put(64, 32, 8); put(64, 52, 2); put(56, 54, 2); put(1, 56, 2)
        put(1, 64, 4); put(5, 68, 4); put(0x1000, 72, 8)
        put(0xFFFF_FFFF_8100_0000, 80, 8); put(0x100_0000, 88, 8)
        put(UInt64(code.count), 96, 8); put(UInt64(code.count) + 0x1000, 104, 8)
        return b + code
    }

    @Test func bzImageLoadsWithZeroPageAndLongModeEntry() throws {
        let payload = (0..<3000).map { UInt8(truncatingIfNeeded: $0 &* 7) }
        let kernel = try LinuxKernel(bytes: Self.bzImage(payload: payload))
        let memory = try GuestMemory(size: Self.ramSize)
        let initrd = (0..<5000).map { UInt8(truncatingIfNeeded: $0 &* 13) }
        let state = try kernel.load(into: memory, commandLine: "console=ttyS0 quiet", initrd: initrd)

        #expect(try memory.read(at: 0x10_0000, count: payload.count) == payload)
        #expect(state.rip == 0x10_0200)
        #expect(state.rsi == LinuxKernel.bootParamsAddress)
        #expect(state.efer & 0x500 == 0x500 && state.cr0 & 0x8000_0001 == 0x8000_0001 && state.cr4 & 0x20 != 0)
        #expect(state.cs.l && state.cs.selector == 0x10 && state.ds.selector == 0x18)
        let zp = LinuxKernel.bootParamsAddress
        #expect(try memory.load(UInt16.self, at: zp + 0x1FE) == 0xAA55)
        #expect(try memory.load(UInt32.self, at: zp + 0x202) == 0x5372_6448)
        #expect(try memory.load(UInt8.self, at: zp + 0x210) == 0xFF)
        let commandLine = try memory.load(UInt32.self, at: zp + 0x228)
        #expect(try memory.read(at: UInt64(commandLine), count: 20) == Array("console=ttyS0 quiet".utf8) + [0])
        let ramdisk = UInt64(try memory.load(UInt32.self, at: zp + 0x218))
        #expect(try memory.load(UInt32.self, at: zp + 0x21C) == UInt32(initrd.count))
        #expect(ramdisk & 0xFFF == 0 && ramdisk + UInt64(initrd.count) <= Self.ramSize)
        #expect(ramdisk >= 0x100_0000 + 0x40_0000, "the initrd lies above the decompressed kernel")
        #expect(try memory.read(at: ramdisk, count: initrd.count) == initrd)
        // e820: four entries; usable RAM ends at the top of guest RAM.
        #expect(try memory.load(UInt8.self, at: zp + 0x1E8) == 4)
        let last = zp + 0x2D0 + 3 * 20
        #expect(try memory.load(UInt64.self, at: last) == 0x10_0000)
        #expect(try memory.load(UInt64.self, at: last + 8) == Self.ramSize - 0x10_0000)
        #expect(try memory.load(UInt32.self, at: last + 16) == 1)
        // The page tables identity-map the entry point: PML4 → PDPT → PD, 2 MiB page 0.
        let pml4e = try memory.load(UInt64.self, at: state.cr3)
        let pdpte = try memory.load(UInt64.self, at: pml4e & ~0xFFF)
        let pde = try memory.load(UInt64.self, at: pdpte & ~0xFFF)
        #expect(pde == 0x83)
    }

    @Test func vmlinuxEntersAtThePhysicalEntryPoint() throws {
        let code = [UInt8](repeating: 0x90, count: 64)
        let kernel = try LinuxKernel(bytes: Self.vmlinux(code: code))
        let memory = try GuestMemory(size: Self.ramSize)
        let state = try kernel.load(into: memory, commandLine: "", initrd: nil)
        #expect(state.rip == 0x100_0010)
        #expect(try memory.read(at: 0x100_0000, count: 64) == code)
        #expect(try memory.load(UInt32.self, at: LinuxKernel.bootParamsAddress + 0x202) == 0x5372_6448)
    }

    @Test func malformedHeadersNameTheProblem() throws {
        let good = Self.bzImage(payload: [UInt8](repeating: 0xCC, count: 1024))
        func rejected(_ change: (inout [UInt8]) -> Void) -> String? {
            var b = good
            change(&b)
            do { _ = try LinuxKernel(bytes: b); return nil } catch { return error.description }
        }
        #expect(rejected { $0[0x206] = 0x0B }?.contains("older than 2.12") == true)
        #expect(rejected { $0[0x236] = 0 }?.contains("XLF_KERNEL_64") == true)
        #expect(rejected { $0[0x1F1] = 200 }?.contains("setup sectors") == true)
        #expect(rejected { $0[0x24C] = 0xFF; $0[0x24D] = 0xFF }?.contains("payload") == true)
        #expect(rejected { $0[0x230] = 3 }?.contains("power of two") == true)
        #expect(rejected { $0.removeSubrange(0x260...) }?.contains("header length") == true, "truncated inside the header")
        #expect(rejected { $0[0x202] = 0 }?.contains("neither a bzImage") == true)
        // A kernel that needs more RAM than there is says so at load.
        let big = try LinuxKernel(bytes: Self.bzImage(payload: [1, 2, 3], initSize: 0x800_0000))
        #expect(throws: LinuxBootError.self) { try big.load(into: try GuestMemory(size: Self.ramSize), commandLine: "", initrd: nil) }
    }

    @Test func damagedHeadersGiveTypedErrorsNeverACrash() throws {
        let good = Self.bzImage(payload: (0..<2048).map { UInt8(truncatingIfNeeded: $0) })
        let memory = try GuestMemory(size: Self.ramSize)
        let seed = FuzzBudget.seed(0x11_2022)
        var g = SplitMix64(seed: seed)
        var loaded = 0, rejected = 0
        for iteration in 0..<FuzzBudget.iterations(standard: 400) {
            var b = good
            for _ in 0..<1 + Int(g.next() % 3) { Mutation.random(&g).apply(to: &b, in: 0x1F1..<min(b.count, 0x268), &g) }
            do {
                let kernel = try LinuxKernel(bytes: b)
                let state = try kernel.load(into: memory, commandLine: "x", initrd: [1, 2, 3])
                #expect(state.rip == 0x10_0200, "seed \(seed) iteration \(iteration)")
                loaded += 1
            } catch is LinuxBootError {
                rejected += 1
            } catch {
                Issue.record("seed \(seed) iteration \(iteration): untyped error \(error)")
            }
        }
        #expect(loaded > 0 && rejected > 0, "loaded \(loaded), rejected \(rejected)")
    }

    @Test func acpiTablesChecksumAndPowerOffPath() throws {
        let memory = try GuestMemory(size: Self.ramSize)
        try ACPITables.write(into: memory, vcpuCount: 2, ioapicID: 2)
        let rsdp = try memory.read(at: ACPITables.rsdpAddress, count: 36)
        #expect(Array(rsdp[0..<8]) == Array("RSD PTR ".utf8))
        #expect(rsdp[0..<20].reduce(0, &+) == 0 && rsdp.reduce(0, &+) == 0)
        let xsdt = UInt64(try memory.load(UInt32.self, at: ACPITables.rsdpAddress + 24))
        // Every table the XSDT names, and the DSDT the FADT names, checksums to zero.
        var signatures: [String] = []
        let xsdtLength = Int(try memory.load(UInt32.self, at: xsdt + 4))
        for k in 0..<(xsdtLength - 36) / 8 {
            let at = try memory.load(UInt64.self, at: xsdt + 36 + UInt64(k) * 8)
            let length = Int(try memory.load(UInt32.self, at: at + 4))
            let bytes = try memory.read(at: at, count: length)
            #expect(bytes.reduce(0, &+) == 0)
            signatures.append(String(decoding: bytes[0..<4], as: UTF8.self))
        }
        #expect(signatures == ["FACP", "APIC", "MCFG"])
        let dsdt = UInt64(try memory.load(UInt32.self, at: ACPITables.fadtAddress + 40))
        let dsdtBytes = try memory.read(at: dsdt, count: Int(try memory.load(UInt32.self, at: dsdt + 4)))
        #expect(dsdtBytes.reduce(0, &+) == 0 && String(decoding: dsdtBytes[37..<41], as: UTF8.self) == "_S5_")
        // MADT: two processors, then the I/O APIC.
        let madt = try memory.read(at: ACPITables.madtAddress, count: 36 + 8 + 16 + 12)
        #expect(madt[44] == 0 && madt[47] == 0 && madt[52] == 0 && madt[55] == 1 && madt[60] == 1 && madt[62] == 2)
    }

    @Test func powerManagementPowersOffOnlyOnS5() {
        let offs = Mutex(0)
        let pm = ACPIPowerManagement(sleepTypeS5: 5) { offs.withLock { $0 += 1 } }
        #expect(pm.portRead(offset: 4, size: 2) & 1 == 1, "SCI_EN: always in ACPI mode")
        pm.portWrite(offset: 4, size: 2, value: 5 << 10)  // SLP_TYP alone
        pm.portWrite(offset: 4, size: 2, value: 3 << 10 | 1 << 13)  // another sleep state
        #expect(offs.withLock { $0 } == 0)
        pm.portWrite(offset: 4, size: 2, value: 5 << 10 | 1 << 13)
        #expect(offs.withLock { $0 } == 1)
        pm.portWrite(offset: 2, size: 2, value: 0x0121)
        #expect(pm.portRead(offset: 2, size: 2) == 0x0121)
    }
}
