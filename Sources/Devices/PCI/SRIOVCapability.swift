/// The SR-IOV extended capability (PCIe base spec §9.3.3) of a physical function: the
/// guest (the PF's driver) writes NumVFs and sets VF Enable; the VFs then answer at
/// PF + First VF Offset + i × VF Stride.
public struct SRIOVCapability: Sendable, Equatable {
    public static let id: UInt16 = 0x0010
    /// Offsets from the capability's start.
    public static let control = 0x08, initialVFs = 0x0C, totalVFsOffset = 0x0E, numVFs = 0x10
    public static let firstVFOffset = 0x14, vfStride = 0x16, vfDeviceID = 0x1A, systemPageSize = 0x20
    public static let vfEnable: UInt16 = 1 << 0, vfMemorySpaceEnable: UInt16 = 1 << 3

    public let offset: Int
    public let totalVFs: UInt16

    public init(totalVFs: UInt16, vfDeviceID: UInt16, in config: inout PCIConfigSpace) {
        var body = [UInt8](repeating: 0, count: 0x40 - 4)
        var mask = [UInt8](repeating: 0, count: 0x40 - 4)
        func put16(_ at: Int, _ v: UInt16) { body[at - 4] = UInt8(v & 0xFF); body[at - 3] = UInt8(v >> 8) }
        put16(Self.initialVFs, totalVFs)
        put16(Self.totalVFsOffset, totalVFs)
        put16(Self.firstVFOffset, 1)
        put16(Self.vfStride, 1)
        put16(Self.vfDeviceID, vfDeviceID)
        body[0x1C - 4] = 1                 // supported page sizes: 4 KiB
        body[Self.systemPageSize - 4] = 1  // system page size: 4 KiB
        mask[Self.control - 4] = UInt8(Self.vfEnable | Self.vfMemorySpaceEnable)
        mask[Self.numVFs - 4] = 0xFF
        mask[Self.numVFs - 3] = 0xFF
        offset = config.addExtendedCapability(id: Self.id, version: 1, body: body, mask: mask)
        self.totalVFs = totalVFs
    }

    public func isEnabled(_ config: PCIConfigSpace) -> Bool { config.read16(offset + Self.control) & Self.vfEnable != 0 }
    public func requestedVFs(_ config: PCIConfigSpace) -> UInt16 { config.read16(offset + Self.numVFs) }
    /// True when a write at `[at, at+size)` touched the control or NumVFs registers.
    public func covers(_ at: Int, size: Int) -> Bool {
        at < offset + Self.numVFs + 2 && offset + Self.control < at + size
    }
}
