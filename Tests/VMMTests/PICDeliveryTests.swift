import Devices
import Foundation
import TestSupport
import Testing
import VirtCore
@testable import VMM

/// 8259 interrupts reach a vCPU on each engine: a tiny 64-bit kernel (a vmlinux ELF on the
/// PC platform) initialises the pair (vectors 0x30 and 0x38), unmasks IRQ 4 and the slave's
/// IRQ 9, pulses them through pc-testdev's interrupt lines and waits in `hlt`; the handlers
/// record their vector and send the EOIs. The vector comes from the 8259's acknowledge when
/// the vCPU takes the ExtINT through the boot CPU's LINT0 (virtual wire, as at reset).
@Suite struct PICDeliveryTests {
    static let idtr: UInt64 = 0x2F00, idt: UInt64 = 0x3000, record: UInt64 = 0x2E00
    static let masterVector: UInt8 = 0x34, slaveVector: UInt8 = 0x39

    static func le<T: FixedWidthInteger>(_ v: T) -> [UInt8] { withUnsafeBytes(of: v.littleEndian) { Array($0) } }

    /// `mov byte [abs], imm8`.
    static func storeByte(_ address: UInt64, _ value: UInt8) -> [UInt8] {
        [0xC6, 0x04, 0x25] + le(UInt32(address)) + [value]
    }
    static func out(_ port: UInt8, _ value: UInt8) -> [UInt8] { [0xB0, value, 0xE6, port] }
    /// Raises and lowers pc-testdev line `line` (port 0x2000 + line).
    static func pulse(_ line: UInt8) -> [UInt8] { [0x66, 0xBA, line, 0x20, 0xB0, 0x01, 0xEE, 0xB0, 0x00, 0xEE] }

    /// The kernel's code (entry 0x10 into its segment) and the handlers' offsets in it.
    static func kernelCode() -> (code: [UInt8], master: Int, slave: Int) {
        var code = [UInt8](repeating: 0x90, count: 0x10)
        code += [0x48, 0xBC] + le(UInt64(0x2D00))  // mov rsp, 0x2D00
        code += [0x0F, 0x01, 0x1C, 0x25] + le(UInt32(idtr))  // lidt [idtr]
        code += out(0x20, 0x11) + out(0x21, 0x30) + out(0x21, 0x04) + out(0x21, 0x01)  // master: ICW1–ICW4
        code += out(0xA0, 0x11) + out(0xA1, 0x38) + out(0xA1, 0x02) + out(0xA1, 0x01)  // slave
        code += out(0x21, 0xEB) + out(0xA1, 0xFD)  // unmask IRQ 4, the cascade and IRQ 9
        code += pulse(4) + [0xFB, 0xF4, 0xFA]  // sti; hlt (the handler runs); cli
        code += pulse(9) + [0xFB, 0xF4, 0xFA]
        code += out(0xF4, 0) + [0xF4]  // isa-debug-exit: status 1
        let master = code.count
        code += storeByte(record, masterVector) + out(0x20, 0x20) + [0x48, 0xCF]  // EOI; iretq
        let slave = code.count
        code += storeByte(record + 1, slaveVector) + out(0xA0, 0x20) + out(0x20, 0x20) + [0x48, 0xCF]
        return (code, master, slave)
    }

    /// A 64-bit interrupt gate to `handler` (code selector 0x10).
    static func gate(_ handler: UInt64) -> [UInt8] {
        le(UInt16(handler & 0xFFFF)) + [0x10, 0x00, 0x00, 0x8E]
            + le(UInt16((handler >> 16) & 0xFFFF))
            + le(UInt32(handler >> 32)) + [0, 0, 0, 0]
    }

    @Test(arguments: TestEngines.available)
    func irq4AndCascadedIRQ9ArriveWithThe8259sVectors(engine: EngineChoice) throws {
        let (code, master, slave) = Self.kernelCode()
        let config = MachineConfiguration(memorySize: 64 << 20, vcpuCount: 1, timeoutSeconds: 120)
        let machine = try PCPlatform.machine(kernel: LinuxBootLoaderTests.vmlinux(code: code), configuration: config,
                                             engine: try TestEngines.make(engine), serialOutput: { _ in })
        let codeBase: UInt64 = 0x100_0000  // where vmlinux(code:) loads its segment
        try machine.memory.write(Self.gate(codeBase + UInt64(master)), at: Self.idt + UInt64(Self.masterVector) * 16)
        try machine.memory.write(Self.gate(codeBase + UInt64(slave)), at: Self.idt + UInt64(Self.slaveVector) * 16)
        try machine.memory.write(Self.le(UInt16(0xFFF))
                                 + Self.le(Self.idt), at: Self.idtr)
        let result = try machine.run()
        guard case .exitPort(status: 1) = result.stopReason else {
            Issue.record("\(engine): stopped with \(result.stopReason), recorded \(try machine.memory.read(at: Self.record, count: 2))")
            return
        }
        #expect(try machine.memory.read(at: Self.record, count: 2) == [Self.masterVector, Self.slaveVector])
        // Both EOIs arrived: nothing in service on either chip.
        let pic = try #require(machine.pcPlatform?.pic)
        pic.masterPorts.portWrite(offset: 0, size: 1, value: 0x0B)
        pic.slavePorts.portWrite(offset: 0, size: 1, value: 0x0B)
        #expect(pic.masterPorts.portRead(offset: 0, size: 1) == 0 && pic.slavePorts.portRead(offset: 0, size: 1) == 0)
    }

    /// A PC record from before the 8259 delivered interrupts (each chip's mask, init step and
    /// OCW3 choice as `masterPIC` and `slavePIC`) still restores: the masks come back. A
    /// record with neither form is refused with the device named.
    @Test func recordsFromBeforeDeliveryRestoreTheirMasks() throws {
        func machine() throws -> Machine {
            try PCPlatform.machine(kernel: LinuxBootLoaderTests.vmlinux(code: [0xF4]), configuration: MachineConfiguration(memorySize: 64 << 20),
                                   engine: try TestEngines.make(.software), serialOutput: { _ in })
        }
        let source = try #require(try machine().pcPlatform)
        var record = try #require(try JSONSerialization.jsonObject(with: JSONEncoder().encode(source.savedState)) as? [String: Any])
        record["pic"] = nil
        record["masterPIC"] = ["mask": 0xB8, "initStep": 0, "readISR": false]
        record["slavePIC"] = ["mask": 0x8F, "initStep": 0, "readISR": true]
        let old = try JSONDecoder().decode(PCPlatformDevices.SavedState.self, from: JSONSerialization.data(withJSONObject: record))
        let target = try #require(try machine().pcPlatform)
        try target.restore(old, timeStampCounters: [0])
        #expect(target.pic.masterPorts.portRead(offset: 1, size: 1) == 0xB8 && target.pic.slavePorts.portRead(offset: 1, size: 1) == 0x8F)

        record["masterPIC"] = nil
        record["slavePIC"] = nil
        let neither = try JSONDecoder().decode(PCPlatformDevices.SavedState.self, from: JSONSerialization.data(withJSONObject: record))
        #expect(throws: DeviceStateError.self) { try #require(try machine().pcPlatform).restore(neither, timeStampCounters: [0]) }
    }
}
