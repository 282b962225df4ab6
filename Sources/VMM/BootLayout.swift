import VirtCore

/// The guest-physical memory map and entry state every guest is started with
/// (docs/guest-abi.md). Everything below 1 MiB belongs to the VMM.
public enum BootLayout {
    public static let gdtAddress: UInt64 = 0x1000
    public static let bootInfoAddress: UInt64 = 0x2000
    public static let commandLineAddress: UInt64 = 0x3000
    public static let commandLineCapacity = 4095
    public static let pml4Address: UInt64 = 0x10000
    public static let pageTablesEnd: UInt64 = 0x50000
    /// The S1 status device's shared page (in the VMM's area, below the stacks).
    public static let statusPageAddress: UInt64 = 0x5F000
    /// An SR-IOV virtual function's register page (S4): RAM behind the VF's BAR0.
    public static let vfRegisterPageAddress: UInt64 = 0x5E000
    public static let stackRegionStart: UInt64 = 0x60000
    public static let stackTop: UInt64 = 0xA0000
    public static let stackSize: UInt64 = 0x4000
    public static let maxVCPUs = Int((stackTop - stackRegionStart) / stackSize)
    /// Guest images load at or above this address.
    public static let imageBase: UInt64 = 0x10_0000
    /// RAM may not reach into the MMIO window.
    public static let maxRAM: UInt64 = 3 << 30
    public static let minRAM: UInt64 = 2 << 20
    /// Devices' MMIO window.
    public static let mmioWindowBase: UInt64 = 0xD000_0000
    /// The PCI host bridge's ECAM (then its BAR window), above the device slots.
    public static let pciECAMBase: UInt64 = 0xE000_0000

    public static let bootInfoMagic: UInt32 = 0x4942_5653  // "SVBI"
    public static let bootInfoVersion: UInt32 = 1
    public static let maxDevices = 16

    public static let kernelCodeSelector: UInt16 = 0x08
    public static let kernelDataSelector: UInt16 = 0x10

    /// Devices' slots in the MMIO window, one page each.
    public static let deviceSlotSize: UInt64 = 0x1000
    /// Device interrupt `irq` arrives as vector `irqVectorBase + irq`.
    public static let irqVectorBase: UInt8 = 0x20

    /// `sv_device.type` values.
    public enum DeviceType: UInt32, Sendable {
        /// A virtio-mmio transport; the guest reads its DeviceID register.
        case virtioMMIO = 1
        /// The S1 status device's shared page (`base` is in RAM).
        case statusPage = 2
        /// The emulated NIC with a classic register interface.
        case emulatedNIC = 3
        /// A periodic timer interrupt (S12's partition timer): only `irq` is meaningful.
        case periodicTimer = 5
        /// The PCI host bridge: `base` is ECAM, followed by the window BARs are placed in.
        case pciHostBridge = 6
    }

    /// A device entry for boot info.
    public struct DeviceEntry: Sendable, Equatable {
        public var type: UInt32, irq: UInt32, base: UInt64, size: UInt64
        public init(type: UInt32, irq: UInt32, base: UInt64, size: UInt64) {
            self.type = type; self.irq = irq; self.base = base; self.size = size
        }
    }

    /// Bytes of the identity map: all of RAM and the 32-bit MMIO hole, whole GiBs.
    static func identityMapSize(ram: UInt64) -> UInt64 {
        let gib: UInt64 = 1 << 30
        return max(4 * gib, (ram + gib - 1) / gib * gib)
    }

    /// Writes the GDT, page tables, boot info and command line into `memory`.
    public static func prepare(memory: GuestMemory, vcpuCount: Int, commandLine: String,
                               hypercall: HypercallMechanism, devices: [DeviceEntry] = []) throws {
        precondition(vcpuCount >= 1 && vcpuCount <= maxVCPUs, "vCPU count checked by the caller")
        precondition(devices.count <= maxDevices, "device count checked by the caller")
        try memory.zero(at: 0, count: Int(imageBase))

        // GDT: null, 64-bit code DPL0, data DPL0.
        try memory.store(UInt64(0), at: gdtAddress)
        try memory.store(UInt64(0x00AF_9B00_0000_FFFF), at: gdtAddress + 8)
        try memory.store(UInt64(0x00CF_9300_0000_FFFF), at: gdtAddress + 16)

        // Identity map with 2 MiB pages: PML4[0] → PDPT → one PD per GiB.
        let pdpt = pml4Address + 0x1000
        let firstPD = pml4Address + 0x2000
        let flags: UInt64 = 0x7  // present, writable, user
        try memory.store(pdpt | flags, at: pml4Address)
        let gibs = identityMapSize(ram: memory.size) >> 30
        precondition(firstPD + gibs * 0x1000 <= pageTablesEnd, "page-table area too small")
        for g in 0..<gibs {
            let pd = firstPD + g * 0x1000
            try memory.store(pd | flags, at: pdpt + g * 8)
            for i in 0..<UInt64(512) {
                let frame = (g << 30) | (i << 21)
                try memory.store(frame | flags | 0x80, at: pd + i * 8)  // PS: 2 MiB page
            }
        }

        // Command line.
        let cmd = Array(commandLine.utf8.prefix(commandLineCapacity))
        try memory.write(cmd, at: commandLineAddress)
        try memory.store(UInt8(0), at: commandLineAddress + UInt64(cmd.count))

        // Boot info (layout in docs/guest-abi.md).
        let b = bootInfoAddress
        try memory.store(bootInfoMagic, at: b)
        try memory.store(bootInfoVersion, at: b + 4)
        try memory.store(memory.size, at: b + 8)
        try memory.store(UInt32(vcpuCount), at: b + 16)
        try memory.store(hypercall.bootInfoKind, at: b + 20)
        if case let .portDoorbell(port) = hypercall { try memory.store(port, at: b + 24) }
        try memory.store(UInt16(0x3F8), at: b + 26)
        try memory.store(UInt16(0xF4), at: b + 28)
        try memory.store(UInt16(0), at: b + 30)
        try memory.store(UInt32(cmd.count), at: b + 32)
        try memory.store(commandLineAddress, at: b + 40)
        for (i, d) in devices.enumerated() { try writeDevice(d, index: i, memory: memory) }
    }

    /// Writes boot-info device entry `index` and raises `device_count` to cover it.
    public static func writeDevice(_ d: DeviceEntry, index: Int, memory: GuestMemory) throws {
        precondition(index < maxDevices, "device count checked by the caller")
        let b = bootInfoAddress
        let e = b + 48 + UInt64(index) * 24
        try memory.store(d.type, at: e)
        try memory.store(d.irq, at: e + 4)
        try memory.store(d.base, at: e + 8)
        try memory.store(d.size, at: e + 16)
        let count: UInt16 = try memory.load(at: b + 30)
        if count <= index { try memory.store(UInt16(index + 1), at: b + 30) }
    }

    /// The long-mode state vCPU `id` starts in.
    public static func initialState(vcpu id: Int, entry: UInt64) -> VCPUState {
        var s = VCPUState()
        s.rip = entry
        s.rsp = stackTop - UInt64(id) * stackSize
        s.rdi = bootInfoAddress
        s.rsi = UInt64(id)
        s.rflags = 0x2
        s.cs = .code64(selector: kernelCodeSelector)
        let data = SegmentRegister.data(selector: kernelDataSelector)
        s.ds = data; s.es = data; s.fs = data; s.gs = data; s.ss = data
        s.tr = SegmentRegister(selector: 0, base: 0, limit: 0xFFFF, type: 0xB, present: true)
        s.ldtr = SegmentRegister(selector: 0, base: 0, limit: 0xFFFF, type: 0x2, present: true)
        s.gdt = DescriptorTableRegister(base: gdtAddress, limit: 23)
        s.idt = DescriptorTableRegister(base: 0, limit: 0)
        s.cr0 = 0x8005_0033  // PG | AM | WP | NE | ET | MP | PE
        s.cr3 = pml4Address
        s.cr4 = 0x620        // OSXMMEXCPT | OSFXSR | PAE
        s.efer = 0xD01       // NXE | LMA | LME | SCE
        return s
    }
}
