import Testing
import VirtCore
@testable import Devices

/// A VF as its VM's PCI bus shows it: IDs and class, BAR0 fixed at the register page but
/// sizable, MSI-X in a trapped BAR2, the receive interrupt sent only when enabled and unmasked.
@Suite struct AssignedVirtualFunctionTests {
    static let ecam: UInt64 = 0xE000_0000
    static let page: UInt64 = 0x5E000
    static let at = RequesterID(bus: 0, device: 1, function: 0)

    private func setup() throws -> (PCIHostBridge, AssignedVirtualFunction, MessageLog) {
        let bridge = PCIHostBridge(mmioBase: Self.ecam, buses: 2)
        let sent = MessageLog()
        let vf = AssignedVirtualFunction(registerPage: Self.page, msixBase: bridge.barWindow.lowerBound) { sent.append($0) }
        try bridge.attach(vf, at: Self.at, config: vf.initialConfig)
        return (bridge, vf, sent)
    }

    /// ECAM offset of register `reg` of 00:01.0.
    private func config(_ reg: Int) -> UInt64 { 1 << 15 | UInt64(reg) }

    @Test func identifiesAsAnEthernetVirtualFunction() throws {
        let (bridge, _, _) = try setup()
        #expect(bridge.mmioRead(offset: config(0), size: 4) == UInt64(SRIOVNICFunction.vfDeviceID) << 16 | UInt64(SRIOVNICFunction.vendorID))
        #expect(bridge.mmioRead(offset: config(8), size: 4) >> 8 == UInt64(SRIOVNICFunction.ethernetClass))
        let msix = try #require(bridge.config(of: Self.at)?.findCapability(MSIX.capabilityID))
        // Table at offset 0 of BAR2, PBA at 0x800 of BAR2.
        #expect(bridge.mmioRead(offset: config(msix + 4), size: 4) == 2)
        #expect(bridge.mmioRead(offset: config(msix + 8), size: 4) == 0x802)
    }

    @Test func registerBARSizesButStaysOnItsPage() throws {
        let (bridge, _, _) = try setup()
        let bar0 = config(PCIConfigSpace.bar0)
        #expect(bridge.mmioRead(offset: bar0, size: 4) == Self.page)
        bridge.mmioWrite(offset: bar0, size: 4, value: 0xFFFF_FFFF)
        #expect(bridge.mmioRead(offset: bar0, size: 4) == 0xFFFF_F000)  // 4 KiB
        bridge.mmioWrite(offset: bar0, size: 4, value: Self.page)
        #expect(bridge.mmioRead(offset: bar0, size: 4) == Self.page)
        // Moving it is refused: the register page is RAM the NIC polls where it is.
        bridge.mmioWrite(offset: bar0, size: 4, value: 0x1000_0000)
        #expect(bridge.mmioRead(offset: bar0, size: 4) == Self.page)
        // BAR2 (MSI-X) sizes and moves like any BAR.
        let bar2 = config(PCIConfigSpace.bar0 + 8)
        bridge.mmioWrite(offset: bar2, size: 4, value: 0xFFFF_FFFF)
        #expect(bridge.mmioRead(offset: bar2, size: 4) == 0xFFFF_F000)
        bridge.mmioWrite(offset: bar2, size: 4, value: bridge.barWindow.lowerBound + 0x1000)
        #expect(bridge.mmioRead(offset: bar2, size: 4) == bridge.barWindow.lowerBound + 0x1000)
    }

    @Test func receiveInterruptGoesOnlyWhenEnabledAndUnmasked() throws {
        let (bridge, vf, sent) = try setup()
        let table = bridge.barWindow.lowerBound - Self.ecam
        let msix = try #require(bridge.config(of: Self.at)?.findCapability(MSIX.capabilityID))
        bridge.mmioWrite(offset: config(PCIConfigSpace.command), size: 2, value: UInt64(PCIConfigSpace.memorySpaceEnable))
        bridge.mmioWrite(offset: table, size: 4, value: 0xFEE0_0000)
        bridge.mmioWrite(offset: table + 8, size: 4, value: 0x2E)
        vf.receiveCompleted()  // MSI-X off: nothing, nothing pending
        #expect(sent.all.isEmpty)
        bridge.mmioWrite(offset: config(msix + 2), size: 2, value: UInt64(MSIX.enableBit))
        vf.receiveCompleted()  // enabled, vector still masked: pending
        #expect(sent.all.isEmpty)
        #expect(bridge.mmioRead(offset: table + MSIX.pbaOffset, size: 4) == 1)
        bridge.mmioWrite(offset: table + 12, size: 4, value: 0)  // unmask: the pending message goes
        #expect(sent.all == [MSIX.Message(address: 0xFEE0_0000, data: 0x2E)])
        vf.receiveCompleted()
        #expect(sent.all.count == 2 && vf.interruptsSent.load(ordering: .relaxed) == 2)
        bridge.mmioWrite(offset: config(msix + 2), size: 2, value: UInt64(MSIX.enableBit | MSIX.functionMaskBit))
        vf.receiveCompleted()  // function mask: pending again
        #expect(sent.all.count == 2)
        bridge.mmioWrite(offset: config(msix + 2), size: 2, value: UInt64(MSIX.enableBit))
        #expect(sent.all.count == 3)
    }
}
