import Devices
import Testing
import TestSupport
import VirtCore
@testable import VMM

/// A guest finds the SR-IOV NIC on the PCI bus and enables its VFs, on both engines.
@Suite struct PCIGuestTests {
    @Test(arguments: TestEngines.available)
    func guestDiscoversTheNICSizesItsBARAndEnablesVirtualFunctions(engine: EngineChoice) throws {
        let capture = SerialCapture()
        let m = try bundledMachine("pci-scan", engine: engine, commandLine: "vfs=3 msix=1", capture: capture)
        let bridge = try m.addPCIHostBridge()
        let iommu = IOMMU(), space = HostPhysicalSpace()
        let nic = SRIOVNIC(physicalFunction: RequesterID(bus: 1, device: 0, function: 0), totalVirtualFunctions: 4) { r in
            DeviceDMA(requester: r, iommu: iommu, space: space)
        }
        let pf = SRIOVNICFunction(nic: nic) { [weak m] message in m?.deliverMessageSignalledInterrupt(message) }
        try bridge.attach(pf, at: nic.physicalFunction, config: pf.initialConfig)
        let r = try m.run()
        let text = capture.text
        #expect(r.stopReason == .exitPort(status: 0), "\(text)")
        #expect(text.contains("pci: 01:00.0 vendor 1234 device 10f0 class 020000 (ecam agrees)"), "\(text)")
        #expect(text.contains("pci: BAR0 is 16 KiB"))
        #expect(text.contains("pci: MSI-X at 0x40, 8 vectors"))
        #expect(text.contains("TotalVFs 4, first VF offset 1, stride 1"))
        #expect(text.contains("pci: 3 of 3 VFs answer (enable reads 1)"), "\(text)")
        #expect(text.contains("pci: MSI-X vector 0 pending while masked: 1; interrupts taken: 2"), "\(text)")
        #expect(nic.virtualFunctionCount == 3)
        #expect(bridge.functions.count == 4)
    }
}
