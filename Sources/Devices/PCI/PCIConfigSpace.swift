/// One function's configuration space (4 KiB: the 256-byte PCI header and capabilities,
/// then PCI Express extended capabilities), with a per-bit write mask so read-only fields,
/// BAR size bits and capability links cannot be changed by the guest.
public struct PCIConfigSpace: Sendable, Equatable {
    public static let size = 4096
    public static let vendorID = 0x00, deviceID = 0x02, command = 0x04, status = 0x06
    public static let classCode = 0x09, headerType = 0x0E, bar0 = 0x10, capabilitiesPointer = 0x34
    public static let interruptLine = 0x3C
    /// Command register bits.
    public static let memorySpaceEnable: UInt16 = 1 << 1, busMasterEnable: UInt16 = 1 << 2
    static let statusCapabilitiesList: UInt16 = 1 << 4

    private var bytes = [UInt8](repeating: 0, count: PCIConfigSpace.size)
    private var writable = [UInt8](repeating: 0, count: PCIConfigSpace.size)
    /// Size of each memory BAR (nil: not implemented).
    public private(set) var barSizes: [UInt32?] = Array(repeating: nil, count: 6)
    private var lastCapability: Int?
    private var nextCapability = 0x40
    private var lastExtended: Int?
    private var nextExtended = 0x100

    public init(vendor: UInt16, device: UInt16, classCode: UInt32, revision: UInt8 = 1) {
        set16(Self.vendorID, vendor)
        set16(Self.deviceID, device)
        set32(0x08, classCode << 8 | UInt32(revision))
        // Command: I/O, memory, bus master, interrupt disable are the guest's.
        setMask(Self.command, 2, 0x0407)
        setMask(Self.interruptLine, 1, 0xFF)
    }

    // MARK: raw access (the device's side)

    public func read8(_ o: Int) -> UInt8 { bytes[o] }
    public func read16(_ o: Int) -> UInt16 { UInt16(bytes[o]) | UInt16(bytes[o + 1]) << 8 }
    public func read32(_ o: Int) -> UInt32 { UInt32(read16(o)) | UInt32(read16(o + 2)) << 16 }
    public mutating func set16(_ o: Int, _ v: UInt16) { bytes[o] = UInt8(v & 0xFF); bytes[o + 1] = UInt8(v >> 8) }
    public mutating func set32(_ o: Int, _ v: UInt32) { set16(o, UInt16(v & 0xFFFF)); set16(o + 2, UInt16(v >> 16)) }
    /// Makes the bits of `mask` (little-endian over `count` bytes at `o`) guest-writable.
    public mutating func setMask(_ o: Int, _ count: Int, _ mask: UInt32) {
        for i in 0..<count { writable[o + i] = UInt8(truncatingIfNeeded: mask >> (8 * UInt32(i))) }
    }

    public var commandRegister: UInt16 { read16(Self.command) }

    // MARK: snapshots

    /// All 4 KiB as they stand (the guest's settings and the device's fixed fields).
    public var savedBytes: [UInt8] { bytes }

    /// Takes saved bytes back: the guest-writable bits from `saved`; every other bit must
    /// match this function's, or the record is another device's (nothing changes then).
    public mutating func restore(savedBytes saved: [UInt8]) throws(DeviceStateError) {
        guard saved.count == Self.size else {
            throw DeviceStateError(device: "PCI configuration space", "\(saved.count) bytes saved, \(Self.size) expected")
        }
        if let at = saved.indices.first(where: { (saved[$0] ^ bytes[$0]) & ~writable[$0] != 0 }) {
            throw DeviceStateError(device: "PCI configuration space", "read-only byte 0x\(String(at, radix: 16)) differs from this function's: saved for another device")
        }
        bytes = saved
    }

    // MARK: the guest's side

    /// A configuration read of 1, 2 or 4 bytes (naturally aligned; others read all ones).
    public func guestRead(offset: Int, size: Int) -> UInt32 {
        guard [1, 2, 4].contains(size), offset % size == 0, offset + size <= Self.size else { return 0xFFFF_FFFF }
        var v: UInt32 = 0
        for i in 0..<size { v |= UInt32(bytes[offset + i]) << (8 * UInt32(i)) }
        return v
    }

    /// A configuration write: only writable bits change.
    public mutating func guestWrite(offset: Int, size: Int, value: UInt32) {
        guard [1, 2, 4].contains(size), offset % size == 0, offset + size <= Self.size else { return }
        for i in 0..<size {
            let b = UInt8(truncatingIfNeeded: value >> (8 * UInt32(i)))
            let m = writable[offset + i]
            bytes[offset + i] = bytes[offset + i] & ~m | b & m
        }
    }

    // MARK: BARs

    /// A 32-bit memory BAR of `size` bytes (a power of two, at least 4 KiB): the guest sizes
    /// it by writing all ones and reading back ~(size − 1).
    public mutating func addMemoryBAR(_ index: Int, size: UInt32) {
        precondition(index < 6 && size >= 4096 && size & (size - 1) == 0, "BAR size is a power of two ≥ 4 KiB")
        barSizes[index] = size
        setMask(Self.bar0 + 4 * index, 4, ~(size - 1))
    }

    /// Where BAR `index` is mapped now (nil: not implemented, or memory decoding off).
    public func barAddress(_ index: Int) -> UInt64? {
        guard barSizes[index] != nil, commandRegister & Self.memorySpaceEnable != 0 else { return nil }
        return UInt64(read32(Self.bar0 + 4 * index) & 0xFFFF_FFF0)
    }

    // MARK: capabilities

    /// Appends a capability (`body` after the ID and next-pointer bytes); `mask` says which
    /// body bits the guest may write. Returns its offset.
    @discardableResult
    public mutating func addCapability(id: UInt8, body: [UInt8], mask: [UInt8] = []) -> Int {
        let at = nextCapability
        precondition(at + 2 + body.count <= 0x100, "capabilities fit in the first 256 bytes")
        bytes[at] = id
        bytes[at + 1] = 0
        for (i, b) in body.enumerated() { bytes[at + 2 + i] = b }
        for (i, m) in mask.enumerated() { writable[at + 2 + i] = m }
        if let last = lastCapability { bytes[last + 1] = UInt8(at) } else { bytes[Self.capabilitiesPointer] = UInt8(at) }
        set16(Self.status, read16(Self.status) | Self.statusCapabilitiesList)
        lastCapability = at
        nextCapability = (at + 2 + body.count + 3) & ~3
        return at
    }

    /// Appends a PCI Express extended capability (header: ID, version, next). Returns its offset.
    @discardableResult
    public mutating func addExtendedCapability(id: UInt16, version: UInt8, body: [UInt8], mask: [UInt8] = []) -> Int {
        let at = nextExtended
        precondition(at + 4 + body.count <= Self.size, "extended capabilities fit in 4 KiB")
        set32(at, UInt32(id) | UInt32(version & 0xF) << 16)
        for (i, b) in body.enumerated() { bytes[at + 4 + i] = b }
        for (i, m) in mask.enumerated() { writable[at + 4 + i] = m }
        if let last = lastExtended { set32(last, read32(last) & 0x000F_FFFF | UInt32(at) << 20) }
        lastExtended = at
        nextExtended = (at + 4 + body.count + 3) & ~3
        return at
    }

    /// Offset of the first capability with `id`, following the list as a driver does.
    public func findCapability(_ id: UInt8) -> Int? {
        var at = Int(bytes[Self.capabilitiesPointer])
        var hops = 0
        while at != 0 && hops < 48 {
            if bytes[at] == id { return at }
            at = Int(bytes[at + 1])
            hops += 1
        }
        return nil
    }

    public func findExtendedCapability(_ id: UInt16) -> Int? {
        var at = 0x100
        var hops = 0
        while at != 0 && hops < 64 {
            let header = read32(at)
            if header == 0 { return nil }
            if UInt16(header & 0xFFFF) == id { return at }
            at = Int(header >> 20)
            hops += 1
        }
        return nil
    }
}
