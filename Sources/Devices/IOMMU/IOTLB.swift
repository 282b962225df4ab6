/// Which IOTLB entry makes room for a new translation.
public enum IOTLBReplacement: String, CaseIterable, Sendable, Codable {
    /// Least recently used.
    case lru
    /// Oldest inserted.
    case fifo
    /// A pseudo-random entry (fixed seed, so runs repeat).
    case random
}

/// A cached translation: one page of one domain.
public struct IOTLBEntry: Equatable, Sendable {
    public var domain: UInt16
    public var page: IOPageSize
    /// IOVA >> page.shift.
    public var pageNumber: UInt64
    public var hostBase: UInt64
    public var permissions: DMAPermissions
}

/// The IOMMU's translation cache: a fixed number of fully associative entries, each one
/// page (of any size) of one domain.
public struct IOTLB: Sendable {
    private struct Key: Hashable { var domain: UInt16; var shift: UInt8; var pageNumber: UInt64 }

    public let capacity: Int
    public let replacement: IOTLBReplacement
    private var entries: [IOTLBEntry] = []
    private var lastUse: [UInt64] = []
    private var slots: [Key: Int] = [:]
    private var clock: UInt64 = 0
    private var fifoNext = 0
    private var randomState: UInt64 = 0x9E37_79B9_7F4A_7C15
    /// Page sizes present per domain: a lookup only probes those.
    private var sizesPresent: [UInt16: Set<IOPageSize>] = [:]

    public init(capacity: Int, replacement: IOTLBReplacement) {
        precondition(capacity >= 1, "an IOTLB has at least one entry")
        self.capacity = capacity
        self.replacement = replacement
        entries.reserveCapacity(capacity)
        lastUse.reserveCapacity(capacity)
    }

    public var count: Int { entries.count }

    /// The cached translation of `iova` in `domain`, if any.
    public mutating func lookup(domain: UInt16, iova: UInt64) -> IOTLBEntry? {
        guard let sizes = sizesPresent[domain] else { return nil }
        for page in IOPageSize.allCases where sizes.contains(page) {
            let key = Key(domain: domain, shift: UInt8(page.shift), pageNumber: iova >> UInt64(page.shift))
            if let slot = slots[key] {
                clock &+= 1
                lastUse[slot] = clock
                return entries[slot]
            }
        }
        return nil
    }

    public mutating func insert(_ entry: IOTLBEntry) {
        let key = Self.key(entry)
        clock &+= 1
        if let slot = slots[key] {
            entries[slot] = entry
            lastUse[slot] = clock
            return
        }
        let slot: Int
        if entries.count < capacity {
            slot = entries.count
            entries.append(entry)
            lastUse.append(clock)
        } else {
            slot = victim()
            slots[Self.key(entries[slot])] = nil
            entries[slot] = entry
            lastUse[slot] = clock
        }
        slots[key] = slot
        sizesPresent[entry.domain, default: []].insert(entry.page)
    }

    private mutating func victim() -> Int {
        switch replacement {
        case .lru:
            var best = 0
            for i in 1..<entries.count where lastUse[i] < lastUse[best] { best = i }
            return best
        case .fifo:
            defer { fifoNext = (fifoNext + 1) % capacity }
            return fifoNext
        case .random:
            randomState ^= randomState << 13
            randomState ^= randomState >> 7
            randomState ^= randomState << 17
            return Int(randomState % UInt64(capacity))
        }
    }

    private static func key(_ e: IOTLBEntry) -> Key { Key(domain: e.domain, shift: UInt8(e.page.shift), pageNumber: e.pageNumber) }

    /// Drops the entries `matching` selects; returns how many.
    @discardableResult
    public mutating func invalidate(where matching: (IOTLBEntry) -> Bool) -> Int {
        let keep = entries.filter { !matching($0) }
        let dropped = entries.count - keep.count
        guard dropped > 0 else { return 0 }
        entries = []
        lastUse = []
        slots = [:]
        sizesPresent = [:]
        fifoNext = 0
        for e in keep { insert(e) }
        return dropped
    }
}
