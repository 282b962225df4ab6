@testable import Devices
import Synchronization
import Testing
import VirtCore
@testable import VMM

/// The PC platform's PCI as firmware leaves it for Linux: the MCFG table and the DSDT's
/// PCI root and ECAM reservation, and MSI-X messages reaching the local APICs.
@Suite struct PCPlatformPCITests {
    @Test func mcfgNamesECAMAndTheDSDTDeclaresThePCIRootAndReservesECAM() throws {
        let memory = try GuestMemory(size: 16 << 20)
        try ACPITables.write(into: memory, vcpuCount: 1, ioapicID: 1)
        let mcfg = try memory.read(at: ACPITables.mcfgAddress, count: 60)
        #expect(String(decoding: mcfg[0..<4], as: UTF8.self) == "MCFG" && mcfg.reduce(0, &+) == 0)
        #expect(try memory.load(UInt64.self, at: ACPITables.mcfgAddress + 44) == PCPlatformPCI.ecamBase)
        #expect(Array(mcfg[52..<56]) == [0, 0, 0, 0])  // segment 0, buses 0–0
        let dsdt = ACPITables.dsdt()
        #expect(dsdt.reduce(0, &+) == 0)
        func contains(_ needle: [UInt8]) -> Bool {
            dsdt.indices.contains { i in i + needle.count <= dsdt.count && Array(dsdt[i..<(i + needle.count)]) == needle }
        }
        #expect(contains(Array("PCI0".utf8) + [0x08] + Array("_HID".utf8) + [0x0C, 0x41, 0xD0, 0x0A, 0x03]))  // EisaId("PNP0A03")
        #expect(contains(Array("RES0".utf8) + [0x08] + Array("_HID".utf8) + [0x0C, 0x41, 0xD0, 0x0C, 0x02]))  // EisaId("PNP0C02")
        // Memory32Fixed(ReadWrite, ECAM, 1 MiB), then the end tag.
        #expect(contains([0x86, 0x09, 0x00, 0x01, 0x00, 0x00, 0x00, 0xE0, 0x00, 0x00, 0x10, 0x00, 0x79, 0x00]))
        // The scope's PkgLength covers everything after the _S5_ name to the end.
        let scope = try #require(dsdt[36...].firstIndex(of: 0x10))
        let length = Int(dsdt[scope + 1] & 0x0F) | Int(dsdt[scope + 2]) << 4
        #expect(dsdt[scope + 1] >> 6 == 1 && scope + 1 + length == dsdt.count)
    }

    @Test func msiMessagesGoToTheLocalAPICTheyName() {
        let delivered = Mutex<[(Int, UInt8)]>([])
        let apic = LocalAPICBank(vcpuCount: 2, wiring: LocalAPICWiring(
            deliver: { vcpu, vector in delivered.withLock { $0.append((vcpu, vector)) } }, initCPU: { _ in }, startup: { _, _ in }))
        for vcpu in 0..<2 { apic.mmioWrite(vcpu: vcpu, offset: 0xF0, size: 4, value: 0x1FF) }  // software-enable both
        PCPlatformPCI.deliver(MSIX.Message(address: 0xFEE0_1000, data: 0x41), to: apic)  // physical, APIC 1
        PCPlatformPCI.deliver(MSIX.Message(address: 0xFEE0_0000, data: 0x52), to: apic)  // physical, APIC 0
        #expect(delivered.withLock { $0.map { "\($0.0):\($0.1)" } } == ["1:65", "0:82"])
    }
}
