/// Sizes of an I/O page (VT-d second-level paging: 4 KiB, 2 MiB and 1 GiB).
public enum IOPageSize: Int, CaseIterable, Sendable, Codable, CustomStringConvertible {
    case size4K = 12
    case size2M = 21
    case size1G = 30

    public var shift: Int { rawValue }
    public var bytes: UInt64 { 1 << UInt64(rawValue) }
    /// Table level whose entries map a page of this size (1: the last level).
    var level: Int { (rawValue - 12) / 9 + 1 }

    public var description: String {
        switch self {
        case .size4K: return "4K"
        case .size2M: return "2M"
        case .size1G: return "1G"
        }
    }
}

/// What a device may do through a mapping.
public struct DMAPermissions: OptionSet, Hashable, Sendable, Codable {
    public let rawValue: UInt8
    public init(rawValue: UInt8) { self.rawValue = rawValue }
    public static let read = DMAPermissions(rawValue: 1)
    public static let write = DMAPermissions(rawValue: 2)
    public static let readWrite: DMAPermissions = [.read, .write]
}

/// Why a mapping could not be changed.
public enum IOPageTableError: Error, Equatable, Sendable, CustomStringConvertible {
    case misaligned(iova: UInt64, hpa: UInt64, page: IOPageSize)
    case beyondAddressWidth(iova: UInt64)
    case noPermissions(iova: UInt64)
    /// The range is already mapped (by a page of another size, or at all).
    case alreadyMapped(iova: UInt64)
    case notMapped(iova: UInt64, page: IOPageSize)

    public var description: String {
        switch self {
        case let .misaligned(iova, hpa, page):
            return "I/O page \(page): IOVA 0x\(String(iova, radix: 16)) or address 0x\(String(hpa, radix: 16)) is not aligned"
        case let .beyondAddressWidth(iova):
            return "IOVA 0x\(String(iova, radix: 16)) is beyond the IOMMU's 48-bit address width"
        case let .noPermissions(iova):
            return "mapping at IOVA 0x\(String(iova, radix: 16)) grants neither read nor write"
        case let .alreadyMapped(iova):
            return "IOVA 0x\(String(iova, radix: 16)) is already mapped"
        case let .notMapped(iova, page):
            return "no \(page) page is mapped at IOVA 0x\(String(iova, radix: 16))"
        }
    }
}

/// One domain's I/O page table: four levels of 512 entries, as VT-d's second-level tables.
///
/// Entries use the VT-d second-level layout: bit 0 read, bit 1 write, bit 7 page size
/// (a leaf at level 2 or 3), bits 12–51 the address. An entry is present when it grants
/// read or write. Tables live in one flat array; a non-leaf entry's address field holds
/// the next table's index (times 4 KiB, as if the tables were consecutive frames).
public struct IOPageTable: Sendable {
    public static let addressWidth = 48
    static let readBit: UInt64 = 1, writeBit: UInt64 = 2, pageSizeBit: UInt64 = 1 << 7
    static let addressMask: UInt64 = 0x000F_FFFF_FFFF_F000

    /// All tables, 512 entries each; table 0 is the root (level 4).
    private var entries = [UInt64](repeating: 0, count: 512)
    /// Pages mapped, by size.
    public private(set) var mappedPages: [IOPageSize: Int] = [:]

    public init() {}

    /// Number of tables (each a 4 KiB frame in real hardware).
    public var tableCount: Int { entries.count / 512 }

    private static func index(_ iova: UInt64, level: Int) -> Int { Int((iova >> UInt64(12 + 9 * (level - 1))) & 511) }

    /// Maps `[iova, iova+page)` to `[hpa, hpa+page)`.
    public mutating func map(iova: UInt64, to hpa: UInt64, page: IOPageSize, permissions: DMAPermissions) throws(IOPageTableError) {
        guard iova % page.bytes == 0, hpa % page.bytes == 0 else { throw .misaligned(iova: iova, hpa: hpa, page: page) }
        guard iova >> UInt64(Self.addressWidth) == 0 else { throw .beyondAddressWidth(iova: iova) }
        guard !permissions.isEmpty else { throw .noPermissions(iova: iova) }
        var table = 0
        var level = 4
        while level > page.level {
            let slot = table * 512 + Self.index(iova, level: level)
            let entry = entries[slot]
            if entry & (Self.readBit | Self.writeBit) == 0 {
                let next = tableCount
                entries.append(contentsOf: repeatElement(0, count: 512))
                entries[slot] = UInt64(next) << 12 | Self.readBit | Self.writeBit
                table = next
            } else if entry & Self.pageSizeBit != 0 {
                throw .alreadyMapped(iova: iova)
            } else {
                table = Int((entry & Self.addressMask) >> 12)
            }
            level -= 1
        }
        let slot = table * 512 + Self.index(iova, level: level)
        guard entries[slot] & (Self.readBit | Self.writeBit) == 0 else { throw .alreadyMapped(iova: iova) }
        var entry = hpa | UInt64(permissions.rawValue)
        if page != .size4K { entry |= Self.pageSizeBit }
        entries[slot] = entry
        mappedPages[page, default: 0] += 1
    }

    /// Maps `[iova, iova+length)` to `[hpa, ...)` with pages of `page` size.
    public mutating func mapRange(iova: UInt64, to hpa: UInt64, length: UInt64, page: IOPageSize,
                                  permissions: DMAPermissions) throws(IOPageTableError) {
        var offset: UInt64 = 0
        while offset < length {
            try map(iova: iova + offset, to: hpa + offset, page: page, permissions: permissions)
            offset += page.bytes
        }
    }

    /// Removes the `page`-sized mapping at `iova`. The caller invalidates the IOTLB.
    public mutating func unmap(iova: UInt64, page: IOPageSize) throws(IOPageTableError) {
        guard let slot = leafSlot(iova, page: page) else { throw .notMapped(iova: iova, page: page) }
        entries[slot] = 0
        mappedPages[page, default: 0] -= 1
    }

    private func leafSlot(_ iova: UInt64, page: IOPageSize) -> Int? {
        guard iova % page.bytes == 0, iova >> UInt64(Self.addressWidth) == 0 else { return nil }
        var table = 0
        var level = 4
        while true {
            let slot = table * 512 + Self.index(iova, level: level)
            let entry = entries[slot]
            guard entry & (Self.readBit | Self.writeBit) != 0 else { return nil }
            let leaf = level == 1 || entry & Self.pageSizeBit != 0
            if level == page.level { return leaf ? slot : nil }
            if leaf { return nil }
            table = Int((entry & Self.addressMask) >> 12)
            level -= 1
        }
    }

    /// The result of a walk: the page holding the IOVA, or how far the walk got.
    public struct Walk: Equatable, Sendable {
        /// Host-physical base of the page and its size (nil: not mapped).
        public var pageBase: UInt64?
        public var page: IOPageSize
        public var permissions: DMAPermissions
        /// Table entries read (each a memory access for a hardware walker).
        public var entriesRead: Int
    }

    /// Walks the table for `iova`.
    public func walk(_ iova: UInt64) -> Walk {
        var table = 0
        var level = 4
        var reads = 0
        while true {
            let entry = entries[table * 512 + Self.index(iova, level: level)]
            reads += 1
            guard entry & (Self.readBit | Self.writeBit) != 0 else {
                return Walk(pageBase: nil, page: .size4K, permissions: [], entriesRead: reads)
            }
            if level == 1 || entry & Self.pageSizeBit != 0 {
                let page = IOPageSize(rawValue: 12 + 9 * (level - 1))!
                return Walk(pageBase: entry & Self.addressMask & ~(page.bytes - 1), page: page,
                            permissions: DMAPermissions(rawValue: UInt8(entry & 3)), entriesRead: reads)
            }
            table = Int((entry & Self.addressMask) >> 12)
            level -= 1
        }
    }
}
