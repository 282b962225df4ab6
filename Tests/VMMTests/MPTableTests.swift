import Devices
import TestSupport
import Testing
import VirtCore
@testable import VMM

/// The MP table of a PC-platform machine, found and read from its guest RAM as an MP-spec
/// 1.4 operating system would: scan for the floating pointer, follow it to the "PCMP"
/// configuration table, check both checksums and every entry against the machine (vCPUs,
/// the MADT's I/O APIC) and the e820 map the zero page hands the kernel.
@Suite struct MPTableTests {
    struct FoundTable {
        var pointerAddress: UInt64
        var pointer: [UInt8]
        var header: [UInt8]
        var entries: [[UInt8]]
    }

    /// MP spec §4: the floating pointer lies on a 16-byte boundary in the first KiB of the
    /// EBDA (its segment at 0x40E), the last KiB of base memory, or 0xF0000–0xFFFFF, with
    /// "_MP_" and a zero checksum over its `length` paragraphs.
    static func scan(_ memory: GuestMemory) throws -> FoundTable? {
        let ebda = UInt64(try memory.load(UInt16.self, at: 0x40E)) << 4
        var areas: [(UInt64, Int)] = [(0x9_FC00, 0x400), (0xF_0000, 0x1_0000)]
        if ebda != 0 { areas.insert((ebda, 0x400), at: 0) }
        for (start, count) in areas {
            let bytes = try memory.read(at: start, count: count)
            for offset in stride(from: 0, to: count - 16, by: 16) where Array(bytes[offset..<offset + 4]) == Array("_MP_".utf8) {
                let length = Int(bytes[offset + 8]) * 16
                guard length >= 16, offset + length <= count, bytes[offset..<offset + length].reduce(0, &+) == 0 else { continue }
                let pointer = Array(bytes[offset..<offset + length])
                let tableAddress = UInt64(try memory.load(UInt32.self, at: start + UInt64(offset) + 4))
                let header = try memory.read(at: tableAddress, count: 44)
                let tableLength = Int(header[4]) | Int(header[5]) << 8
                let table = try memory.read(at: tableAddress, count: tableLength)
                #expect(Array(table[0..<4]) == Array("PCMP".utf8))
                #expect(table.reduce(0, &+) == 0, "configuration table checksum")
                var entries: [[UInt8]] = []
                var at = 44
                for _ in 0..<(Int(header[34]) | Int(header[35]) << 8) {
                    let size = table[at] == 0 ? 20 : 8
                    entries.append(Array(table[at..<at + size]))
                    at += size
                }
                #expect(at == tableLength, "the entries fill the base table exactly")
                return FoundTable(pointerAddress: start + UInt64(offset), pointer: pointer, header: header, entries: entries)
            }
        }
        return nil
    }

    static func le32(_ b: [UInt8], _ at: Int) -> UInt32 { (0..<4).reduce(0) { $0 | UInt32(b[at + $1]) << (8 * UInt32($1)) } }

    /// A machine loaded with a Linux kernel (a synthetic bzImage: the tables do not depend on
    /// the kernel) on the software engine, with `vcpus` vCPUs.
    static func machine(vcpus: Int) throws -> Machine {
        let config = MachineConfiguration(memorySize: 64 << 20, vcpuCount: vcpus, commandLine: "console=ttyS0")
        return try PCPlatform.machine(kernel: LinuxBootLoaderTests.bzImage(payload: [UInt8](repeating: 0xF4, count: 512)),
                                      configuration: config, engine: try TestEngines.make(.software), serialOutput: { _ in })
    }

    @Test(arguments: [1, 3])
    func tableDescribesTheMachineAsTheMADTDoes(vcpus: Int) throws {
        let machine = try Self.machine(vcpus: vcpus)
        let found = try #require(try Self.scan(machine.memory), "no MP floating pointer in guest RAM")
        #expect(found.pointerAddress % 16 == 0)
        #expect(found.pointer[9] == 4, "spec revision 1.4")
        #expect(found.pointer[11] == 0, "a configuration table, not a default configuration")
        #expect(found.pointer[12] & 0x80 == 0, "virtual-wire mode: no IMCR")
        #expect(found.header[6] == 4)
        #expect(Self.le32(found.header, 36) == UInt32(LocalAPICBank.base))

        // The MADT's I/O APIC (type 1: ID at 2, address at 4) and processors (type 0: APIC ID at 3).
        let madtLength = Int(try machine.memory.load(UInt32.self, at: ACPITables.madtAddress + 4))
        let madt = try machine.memory.read(at: ACPITables.madtAddress, count: madtLength)
        var madtAPICIDs: [UInt8] = [], madtIOAPIC: (id: UInt8, address: UInt32)?
        var at = 44
        while at < madt.count {
            if madt[at] == 0 { madtAPICIDs.append(madt[at + 3]) }
            if madt[at] == 1 { madtIOAPIC = (madt[at + 2], Self.le32(madt, at + 4)) }
            at += Int(madt[at + 1])
        }
        let ioapic = try #require(madtIOAPIC)

        let processors = found.entries.filter { $0[0] == 0 }
        #expect(processors.count == vcpus)
        #expect(processors.map { $0[1] } == madtAPICIDs)
        #expect(processors.allSatisfy { $0[3] & 1 != 0 }, "every processor enabled")
        #expect(processors.filter { $0[3] & 2 != 0 }.map { $0[1] } == [0], "the boot processor, APIC 0, flagged alone")

        let buses = Dictionary(uniqueKeysWithValues: found.entries.filter { $0[0] == 1 }.map { ($0[1], String(decoding: $0[2..<8], as: UTF8.self)) })
        let isa = try #require(buses.first { $0.value == "ISA   " }?.key)
        #expect(buses.values.contains("PCI   "))

        let ioapics = found.entries.filter { $0[0] == 2 }
        #expect(ioapics.count == 1)
        #expect(ioapics.first?[1] == ioapic.id && ioapics.first.map { Self.le32($0, 4) } == ioapic.address && ioapics.first?[3] == 1)

        // ISA IRQs on the pins the MADT implies (no override: IRQ n on GSI n), the SCI level-triggered.
        let assignments = found.entries.filter { $0[0] == 3 }
        var pinOfIRQ: [UInt8: UInt8] = [:]
        for e in assignments {
            #expect(e[1] == 0 && e[4] == isa && e[6] == ioapic.id, "an INT from the ISA bus to the I/O APIC: \(e)")
            pinOfIRQ[e[5]] = e[7]
            let flags = UInt16(e[2]) | UInt16(e[3]) << 8
            #expect(flags == (e[5] == ACPITables.sciIRQ ? 0x0D : 0), "IRQ \(e[5]) flags \(flags)")
        }
        #expect(pinOfIRQ == Dictionary(uniqueKeysWithValues: ([0, 1] + (3...15)).map { (UInt8($0), UInt8($0)) }))

        // The 8259 on the boot processor's LINT0 (ExtINT), NMI on every LINT1.
        let local = found.entries.filter { $0[0] == 4 }.map { [$0[1], $0[6], $0[7]] }
        #expect(local == [[3, 0, 0], [1, 0xFF, 1]])

        // The e820 map in the zero page reserves where both structures lie.
        let zeroPage = LinuxKernel.bootParamsAddress
        let count = Int(try machine.memory.read(at: zeroPage + 0x1E8, count: 1)[0])
        let tableEnd = UInt64(Self.le32(found.pointer, 4)) + UInt64(Int(found.header[4]) | Int(found.header[5]) << 8)
        let reserved = try (0..<count).contains { k in
            let e = zeroPage + 0x2D0 + UInt64(k) * 20
            let base = try machine.memory.load(UInt64.self, at: e), length = try machine.memory.load(UInt64.self, at: e + 8)
            return try machine.memory.load(UInt32.self, at: e + 16) == 2 && base <= found.pointerAddress && tableEnd <= base + length
        }
        #expect(reserved, "the e820 map does not reserve the MP table")
    }
}
