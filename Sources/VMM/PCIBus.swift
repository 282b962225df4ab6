import Devices
import VirtCore

extension Machine {
    /// Adds a PCI host bridge: configuration ports 0xCF8–0xCFF, ECAM at
    /// `BootLayout.pciECAMBase` followed by the BAR window, listed in boot info. Call
    /// before `run()`.
    @discardableResult
    public func addPCIHostBridge(buses: Int = 2) throws -> PCIHostBridge {
        let bridge = PCIHostBridge(mmioBase: BootLayout.pciECAMBase, buses: buses)
        try attach(bridge, firstPort: PCIHostBridge.configAddressPort, count: PCIHostBridge.portCount)
        try attach(bridge, base: bridge.mmioBase, size: bridge.mmioSize)
        try listDevice(type: .pciHostBridge, base: bridge.mmioBase, size: bridge.mmioSize)
        addMessageSignalledInterruptSource()
        return bridge
    }

    /// Delivers an MSI/MSI-X message: x86's vector is the data's low byte, the destination
    /// APIC ID sits in address bits 12–19 (vCPUs beyond the machine's take vCPU 0).
    public func deliverMessageSignalledInterrupt(_ message: MSIX.Message) {
        let destination = Int(message.address >> 12 & 0xFF)
        raiseInterrupt(vector: message.vector, vcpu: destination < configuration.vcpuCount ? destination : 0)
    }
}
