import Devices
import Synchronization
import VirtCore
#if canImport(Glibc)
import Glibc
#endif

/// A host with an IOMMU and an SR-IOV NIC whose virtual functions are assigned to VMs
/// (scenario S4). Host-physical layout: the VMM's own memory at 3 GiB (past any guest-physical address), VM *k* at (k+1) × 4 GiB;
/// each VF's IOMMU domain maps its VM's guest-physical addresses onto that VM's memory.
public final class DeviceAssignmentPlatform: Sendable {
    public static let vmmBase: UInt64 = 3 << 30
    public static let vmStride: UInt64 = 4 << 30
    public static let nicFunction = RequesterID(bus: 1, device: 0, function: 0)

    public let iommu: IOMMU
    public let space = HostPhysicalSpace()
    public let nic: SRIOVNIC
    /// The VMM's private memory, reachable by no domain (holds a secret for the attack tests).
    public let vmmMemory: GuestMemory
    /// VMs placed in host-physical memory, in order: their RAM (by identity) and name.
    private let placed = Mutex<[(memory: ObjectIdentifier, name: String)]>([])
    private let poller = Mutex<HostThread?>(nil)
    private final class RunFlag: Sendable { let value = Atomic<Bool>(false) }
    private let running = RunFlag()

    public init(virtualFunctions: Int, iommu configuration: IOMMUConfiguration = IOMMUConfiguration(), iommuEnabled: Bool = true) throws {
        let iommu = IOMMU(configuration: configuration)
        iommu.isEnabled = iommuEnabled
        self.iommu = iommu
        let space = self.space
        nic = SRIOVNIC(physicalFunction: Self.nicFunction, totalVirtualFunctions: 7) { requester in
            DeviceDMA(requester: requester, iommu: iommu, space: space)
        }
        try nic.enableVirtualFunctions(virtualFunctions)
        vmmMemory = try GuestMemory(size: 2 << 20, name: "swiftvisor-vmm-private")
        try space.add(vmmMemory, at: Self.vmmBase, owner: .vmm)
    }

    /// Where VM number `k` (in assignment order) sits in host-physical memory.
    public static func hostBase(ofVM k: Int) -> UInt64 { UInt64(k + 1) * vmStride }

    /// Where an assigned VF appears on its VM's own PCI bus.
    public static let guestFunction = RequesterID(bus: 0, device: 1, function: 0)

    /// Gives VF `vf` to `machine` (one VF per VM): places its RAM in host-physical memory,
    /// builds the VF's domain (guest-physical → host-physical, `page`-sized pages,
    /// read/write), attaches the VF to it, and gives the machine a PCI host bridge with the
    /// VF at `guestFunction`: BAR0 its register page (RAM at
    /// `BootLayout.vfRegisterPageAddress`), BAR2 its MSI-X table at the start of the
    /// bridge's BAR window. Returns the VM's host-physical base. Call before the machine runs.
    @discardableResult
    public func assign(vf: Int, to machine: Machine, name: String, page: IOPageSize = .size4K) throws -> UInt64 {
        guard let requester = nic.requester(ofVF: vf) else { throw SRIOVError.noSuchVirtualFunction(vf) }
        let base = try place(machine, name: name)
        try makeDomain(UInt16(vf + 1), for: machine, at: base, page: page)
        try iommu.attach(requester, to: UInt16(vf + 1))
        let bridge = try machine.addPCIHostBridge()
        let function = AssignedVirtualFunction(registerPage: BootLayout.vfRegisterPageAddress, msixBase: bridge.barWindow.lowerBound) {
            [weak machine] message in machine?.deliverMessageSignalledInterrupt(message)
        }
        try bridge.attach(function, at: Self.guestFunction, config: function.initialConfig)
        try nic.assign(vf: vf, registers: machine.memory, at: BootLayout.vfRegisterPageAddress,
                       dmaBase: iommu.isEnabled ? 0 : base, onReceive: { function.receiveCompleted() })
        return base
    }

    /// Puts `machine`'s RAM in host-physical memory (once; later calls return the same base).
    private func place(_ machine: Machine, name: String) throws -> UInt64 {
        let id = ObjectIdentifier(machine.memory)
        let (k, isNew) = placed.withLock { list in
            if let k = list.firstIndex(where: { $0.memory == id }) { return (k, false) }
            list.append((id, name))
            return (list.count - 1, true)
        }
        let base = Self.hostBase(ofVM: k)
        if isNew { try space.add(machine.memory, at: base, owner: .virtualMachine(name)) }
        return base
    }

    /// A domain mapping `machine`'s guest-physical addresses onto its host-physical RAM.
    /// It covers RAM rounded up to whole pages; past RAM nothing backs it and a DMA there
    /// fails as unbacked.
    private func makeDomain(_ domain: UInt16, for machine: Machine, at base: UInt64, page: IOPageSize) throws {
        try iommu.createDomain(domain)
        let size = machine.memory.size
        let length = (size + page.bytes - 1) / page.bytes * page.bytes
        try iommu.updateDomain(domain) { t throws(IOPageTableError) in
            try t.mapRange(iova: 0, to: base, length: length, page: page, permissions: .readWrite)
        }
    }

    /// Confines a virtio device of `machine` behind the IOMMU as PCI function `function`,
    /// in its own `domain`: every buffer it takes is translated and checked, so it can
    /// reach its VM's RAM and nothing else. Call before the machine runs.
    public func confine(_ transport: VirtioMMIOTransport, of machine: Machine, name: String, as function: RequesterID,
                        domain: UInt16, page: IOPageSize = .size4K) throws {
        let base = try place(machine, name: name)
        try makeDomain(domain, for: machine, at: base, page: page)
        try iommu.attach(function, to: domain)
        transport.routeDMA(through: DeviceDMA(requester: function, iommu: iommu, space: space))
    }

    /// The domain a partition's devices share: past the VFs' domains (1–7).
    public static func partitionDomain(ofVM k: Int) -> UInt16 { 0x100 + UInt16(k) }

    /// Confines every virtio device of `machine` (a partition, scenario S12) in one domain
    /// of its own mapping only that VM's RAM: device *i* of the VM placed *k*-th is
    /// function (0x10 + k):i.0. Returns their requester IDs, in slot order. Call after
    /// the devices are added and before the machine runs.
    @discardableResult
    public func confineVirtioDevices(of machine: Machine, name: String) throws -> [RequesterID] {
        let transports = machine.virtioTransports
        let base = try place(machine, name: name)
        let k = Int((base - Self.hostBase(ofVM: 0)) / Self.vmStride)
        guard k < 0xF0, transports.count <= 32 else { throw MachineError.tooManyDevices }
        let domain = Self.partitionDomain(ofVM: k)
        try makeDomain(domain, for: machine, at: base, page: .size4K)
        return try transports.enumerated().map { i, transport in
            let function = RequesterID(bus: 0x10 + UInt8(k), device: UInt8(i), function: 0)
            try iommu.attach(function, to: domain)
            transport.routeDMA(through: DeviceDMA(requester: function, iommu: iommu, space: space))
            return function
        }
    }

    /// Starts the device: a host thread stands for the NIC's own engine, polling the VFs'
    /// doorbells as hardware would (briefly sleeping when idle). `policy` lets it run above
    /// the vCPUs it serves (hardware does not wait for a time slice); if the host refuses
    /// the policy, the engine runs without it.
    public func start(policy: PartitionPolicy = PartitionPolicy()) {
        guard !running.value.exchange(true, ordering: .acquiringAndReleasing) else { return }
        let nic = self.nic
        let running = self.running
        poller.withLock { $0 = HostThread(name: "sriov-nic") {
            try? Partitioning.apply(policy)
            var idle = 0
            while running.value.load(ordering: .acquiring) {
                if nic.service() > 0 { idle = 0; continue }
                idle += 1
                if idle > 256 { usleep(50) } else { sched_yield() }
            }
        } }
    }

    public func stop() {
        guard running.value.exchange(false, ordering: .acquiringAndReleasing) else { return }
        poller.withLock { $0?.join(); $0 = nil }
    }

    deinit { stop() }
}
