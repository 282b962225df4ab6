import Synchronization
import Testing
import VirtCore
@testable import Devices

final class MessageLog: Sendable {
    private let messages = Mutex<[MSIX.Message]>([])
    func append(_ m: MSIX.Message) { messages.withLock { $0.append(m) } }
    var all: [MSIX.Message] { messages.withLock { $0 } }
}

@Suite struct PCIHostBridgeTests {
    static let ecam: UInt64 = 0xE000_0000

    /// The SR-IOV NIC's PF at 01:00.0 behind a bridge; MSI-X messages recorded.
    private func setup() throws -> (PCIHostBridge, SRIOVNICFunction, MessageLog) {
        let bridge = PCIHostBridge(mmioBase: Self.ecam, buses: 2)
        let iommu = IOMMU(), space = HostPhysicalSpace()
        let nic = SRIOVNIC(physicalFunction: RequesterID(bus: 1, device: 0, function: 0), totalVirtualFunctions: 4) { r in
            DeviceDMA(requester: r, iommu: iommu, space: space)
        }
        let sent = MessageLog()
        let pf = SRIOVNICFunction(nic: nic, vectors: 4) { m in sent.append(m) }
        try bridge.attach(pf, at: nic.physicalFunction, config: pf.initialConfig)
        return (bridge, pf, sent)
    }

    private func cf8(_ bus: UInt32, _ dev: UInt32, _ fn: UInt32, _ reg: UInt32) -> UInt32 { 0x8000_0000 | bus << 16 | dev << 11 | fn << 8 | reg }
    private func ecamOffset(_ bus: UInt64, _ dev: UInt64, _ fn: UInt64, _ reg: UInt64) -> UInt64 { bus << 20 | dev << 15 | fn << 12 | reg }

    @Test func bothMechanismsReadTheSameConfigurationAndAbsentFunctionsReadAllOnes() throws {
        let (bridge, _, _) = try setup()
        bridge.portWrite(offset: 0, size: 4, value: cf8(1, 0, 0, 0))
        #expect(bridge.portRead(offset: 0, size: 4) == cf8(1, 0, 0, 0))
        let id = bridge.portRead(offset: 4, size: 4)
        #expect(id == UInt32(SRIOVNICFunction.deviceID) << 16 | UInt32(SRIOVNICFunction.vendorID))
        #expect(bridge.mmioRead(offset: ecamOffset(1, 0, 0, 0), size: 4) == UInt64(id))
        #expect(bridge.portRead(offset: 6, size: 2) == UInt32(SRIOVNICFunction.deviceID))  // 0xCFE: upper half
        bridge.portWrite(offset: 0, size: 4, value: cf8(0, 3, 0, 0))
        #expect(bridge.portRead(offset: 4, size: 4) == 0xFFFF_FFFF)
        #expect(bridge.mmioRead(offset: ecamOffset(0, 3, 0, 0), size: 2) == 0xFFFF)
        // Without the enable bit, the data port reaches nothing.
        bridge.portWrite(offset: 0, size: 4, value: cf8(1, 0, 0, 0) & 0x7FFF_FFFF)
        #expect(bridge.portRead(offset: 4, size: 4) == 0xFFFF_FFFF)
    }

    @Test func barsAreSizedAndPlacedAndReadOnlyFieldsStay() throws {
        let (bridge, _, _) = try setup()
        let bar0 = ecamOffset(1, 0, 0, UInt64(PCIConfigSpace.bar0))
        bridge.mmioWrite(offset: bar0, size: 4, value: 0xFFFF_FFFF)
        #expect(bridge.mmioRead(offset: bar0, size: 4) == 0xFFFF_C000)  // 16 KiB
        bridge.mmioWrite(offset: ecamOffset(1, 0, 0, 0), size: 4, value: 0)  // vendor/device are read-only
        #expect(bridge.mmioRead(offset: ecamOffset(1, 0, 0, 0), size: 2) == UInt64(SRIOVNICFunction.vendorID))
        let base = bridge.barWindow.lowerBound
        bridge.mmioWrite(offset: bar0, size: 4, value: base)
        // Memory decoding off: the BAR does not answer yet.
        #expect(bridge.mmioRead(offset: base - Self.ecam + 12, size: 4) == 0xFFFF_FFFF)
        bridge.mmioWrite(offset: ecamOffset(1, 0, 0, UInt64(PCIConfigSpace.command)), size: 2, value: UInt64(PCIConfigSpace.memorySpaceEnable))
        #expect(bridge.mmioRead(offset: base - Self.ecam + 12, size: 4) == 1)  // vector 0's control: masked
    }

    @Test func capabilitiesAreFoundByWalkingTheLists() throws {
        let (bridge, pf, _) = try setup()
        let config = try #require(bridge.config(of: pf.nic.physicalFunction))
        #expect(config.read16(PCIConfigSpace.status) & (1 << 4) != 0)
        let msix = try #require(config.findCapability(MSIX.capabilityID))
        #expect(config.read16(msix + 2) & 0x7FF == 3)  // table size − 1
        #expect(config.findExtendedCapability(SRIOVCapability.id) == pf.sriov.offset)
        #expect(config.read16(pf.sriov.offset + SRIOVCapability.totalVFsOffset) == 4)
    }

    @Test func enablingSRIOVCreatesTheVirtualFunctionsOnTheBus() throws {
        let (bridge, pf, _) = try setup()
        let cap = UInt64(pf.sriov.offset)
        bridge.mmioWrite(offset: ecamOffset(1, 0, 0, cap + UInt64(SRIOVCapability.numVFs)), size: 2, value: 3)
        #expect(bridge.functions.count == 1)
        bridge.mmioWrite(offset: ecamOffset(1, 0, 0, cap + UInt64(SRIOVCapability.control)), size: 2, value: UInt64(SRIOVCapability.vfEnable))
        #expect(pf.nic.virtualFunctionCount == 3)
        #expect(bridge.functions.map(\.function) == [0, 1, 2, 3])
        // A VF: vendor/device all ones, its own class code (Ethernet).
        #expect(bridge.mmioRead(offset: ecamOffset(1, 0, 2, 0), size: 4) == 0xFFFF_FFFF)
        #expect(bridge.mmioRead(offset: ecamOffset(1, 0, 2, 8), size: 4) >> 8 == 0x02_0000)
        bridge.mmioWrite(offset: ecamOffset(1, 0, 0, cap + UInt64(SRIOVCapability.control)), size: 2, value: 0)
        #expect(pf.nic.virtualFunctionCount == 0 && bridge.functions.count == 1)
        // More VFs than TotalVFs: refused, VF Enable reads back clear.
        bridge.mmioWrite(offset: ecamOffset(1, 0, 0, cap + UInt64(SRIOVCapability.numVFs)), size: 2, value: 9)
        bridge.mmioWrite(offset: ecamOffset(1, 0, 0, cap + UInt64(SRIOVCapability.control)), size: 2, value: UInt64(SRIOVCapability.vfEnable))
        #expect(pf.nic.virtualFunctionCount == 0)
        #expect(bridge.mmioRead(offset: ecamOffset(1, 0, 0, cap + UInt64(SRIOVCapability.control)), size: 2) & 1 == 0)
    }

    @Test func msixMessagesWaitWhileMaskedAndGoWhenUnmasked() throws {
        let (bridge, pf, sent) = try setup()
        let pfID = pf.nic.physicalFunction
        let bar0 = ecamOffset(1, 0, 0, UInt64(PCIConfigSpace.bar0))
        let base = bridge.barWindow.lowerBound
        bridge.mmioWrite(offset: bar0, size: 4, value: base)
        bridge.mmioWrite(offset: ecamOffset(1, 0, 0, UInt64(PCIConfigSpace.command)), size: 2, value: UInt64(PCIConfigSpace.memorySpaceEnable))
        let table = base - Self.ecam
        // Vector 1: address 0xFEE00000, data 0x31, still masked.
        bridge.mmioWrite(offset: table + 16, size: 8, value: 0xFEE0_0000)
        bridge.mmioWrite(offset: table + 24, size: 4, value: 0x31)
        let msix = try #require(bridge.config(of: pfID)?.findCapability(MSIX.capabilityID))
        pf.signal(1, config: try #require(bridge.config(of: pfID)))
        #expect(sent.all.isEmpty)  // MSI-X not enabled: nothing, not even pending
        bridge.mmioWrite(offset: ecamOffset(1, 0, 0, UInt64(msix + 2)), size: 2, value: UInt64(MSIX.enableBit))
        pf.signal(1, config: try #require(bridge.config(of: pfID)))
        #expect(sent.all.isEmpty)
        #expect(bridge.mmioRead(offset: table + MSIX.pbaOffset, size: 8) == 0b10)  // pending
        bridge.mmioWrite(offset: table + 28, size: 4, value: 0)  // unmask vector 1
        #expect(sent.all == [MSIX.Message(address: 0xFEE0_0000, data: 0x31)])
        #expect(bridge.mmioRead(offset: table + MSIX.pbaOffset, size: 8) == 0)
        pf.signal(1, config: try #require(bridge.config(of: pfID)))
        #expect(sent.all.count == 2 && sent.all.last?.vector == 0x31)
    }
}
