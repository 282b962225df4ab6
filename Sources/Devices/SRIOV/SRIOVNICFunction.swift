import Synchronization

/// The SR-IOV NIC on the PCI bus: its physical function with a BAR holding the MSI-X
/// table, an MSI-X capability and the SR-IOV capability whose VF Enable creates the
/// NIC's virtual functions (each then a function on the bus, with its own requester ID).
public final class SRIOVNICFunction: PCIDevice {
    public static let vendorID: UInt16 = 0x1234, deviceID: UInt16 = 0x10F0, vfDeviceID: UInt16 = 0x10F1
    public static let ethernetClass: UInt32 = 0x02_0000
    /// BAR0 offset of the interrupt cause set register: writing vector N raises it (as a
    /// NIC's ICS register does; drivers use it to test their interrupt path).
    public static let interruptCauseSet: UInt64 = 0x1000

    public var name: String { "sriov-nic" }
    public let nic: SRIOVNIC
    public let sriov: SRIOVCapability
    private let msix: Mutex<MSIX>
    private let deliver: @Sendable (MSIX.Message) -> Void
    /// The PF's configuration space as built (attach it to the bridge at `nic.physicalFunction`).
    public let initialConfig: PCIConfigSpace

    /// - Parameter deliver: sends an MSI-X message (the VMM turns it into an interrupt).
    public init(nic: SRIOVNIC, vectors: Int = 8, deliver: @escaping @Sendable (MSIX.Message) -> Void) {
        var config = PCIConfigSpace(vendor: Self.vendorID, device: Self.deviceID, classCode: Self.ethernetClass)
        config.addMemoryBAR(0, size: 16 << 10)
        msix = Mutex(MSIX(vectors: vectors, bar: 0, in: &config))
        sriov = SRIOVCapability(totalVFs: UInt16(nic.totalVirtualFunctions), vfDeviceID: Self.vfDeviceID, in: &config)
        initialConfig = config
        self.nic = nic
        self.deliver = deliver
    }

    /// The device raises MSI-X `vector` (sent now, or left pending while masked).
    public func signal(_ vector: Int, config: PCIConfigSpace) {
        if let m = msix.withLock({ $0.signal(vector, config: config) }) { deliver(m) }
    }

    public func configWritten(function: RequesterID, offset: Int, size: Int, config: inout PCIConfigSpace) -> [RequesterID: PCIConfigSpace]? {
        guard function == nic.physicalFunction else { return nil }
        if msix.withLock({ $0.covers(offset, size: size) }) {
            for m in msix.withLock({ $0.releasePending(config: config) }) { deliver(m) }
        }
        guard sriov.covers(offset, size: size) else { return nil }
        let want = sriov.isEnabled(config) ? Int(sriov.requestedVFs(config)) : 0
        guard want != nic.virtualFunctionCount else { return nil }
        do { try nic.enableVirtualFunctions(want) } catch {
            // NumVFs above TotalVFs: refuse by leaving VF Enable clear.
            config.set16(sriov.offset + SRIOVCapability.control, config.read16(sriov.offset + SRIOVCapability.control) & ~SRIOVCapability.vfEnable)
            try? nic.enableVirtualFunctions(0)
        }
        var vfs: [RequesterID: PCIConfigSpace] = [:]
        for i in 0..<nic.virtualFunctionCount {
            guard let id = nic.requester(ofVF: i) else { continue }
            // A VF's Vendor and Device ID read all ones (its device ID is in the PF's
            // SR-IOV capability); its class and header are its own.
            vfs[id] = PCIConfigSpace(vendor: 0xFFFF, device: 0xFFFF, classCode: Self.ethernetClass)
        }
        return vfs
    }

    public func barRead(function: RequesterID, bar: Int, offset: UInt64, size: UInt8, config: PCIConfigSpace) -> UInt64 {
        guard function == nic.physicalFunction, bar == 0 else { return 0 }
        return msix.withLock { $0.read(offset: offset, size: size) }
    }

    public func barWrite(function: RequesterID, bar: Int, offset: UInt64, size: UInt8, value: UInt64, config: PCIConfigSpace) {
        guard function == nic.physicalFunction, bar == 0 else { return }
        if offset == Self.interruptCauseSet {
            signal(Int(truncatingIfNeeded: value & 0xFFFF), config: config)
            return
        }
        let released = msix.withLock { m in
            m.write(offset: offset, size: size, value: value)
            return m.releasePending(config: config)
        }
        for m in released { deliver(m) }
    }
}
