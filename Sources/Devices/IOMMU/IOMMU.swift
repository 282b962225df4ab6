import Synchronization
import VirtCore

/// A device function on the bus (PCI bus/device/function), the IOMMU's source ID.
public struct RequesterID: Hashable, Sendable, Codable, CustomStringConvertible, Comparable {
    public let rawValue: UInt16

    public init(bus: UInt8, device: UInt8, function: UInt8) {
        precondition(device < 32 && function < 8, "PCI device 0-31, function 0-7")
        rawValue = UInt16(bus) << 8 | UInt16(device) << 3 | UInt16(function)
    }

    public var bus: UInt8 { UInt8(rawValue >> 8) }
    public var device: UInt8 { UInt8((rawValue >> 3) & 31) }
    public var function: UInt8 { UInt8(rawValue & 7) }
    public var description: String {
        "\(String(bus, radix: 16)):\(device < 16 ? "0" : "")\(String(device, radix: 16)).\(function)"
    }
    public static func < (a: Self, b: Self) -> Bool { a.rawValue < b.rawValue }
}

public enum DMAAccess: String, Sendable, Codable {
    case read, write
    var permission: DMAPermissions { self == .read ? .read : .write }
}

/// Why the IOMMU refused a DMA (VT-d's fault reasons, simplified).
public enum DMAFaultReason: String, Sendable, Codable, CustomStringConvertible {
    /// The device has no context entry: it is assigned to no domain.
    case contextNotPresent = "context-not-present"
    /// The IOVA is not mapped in the device's domain.
    case pageNotPresent = "page-not-present"
    case readDenied = "read-denied"
    case writeDenied = "write-denied"
    case beyondAddressWidth = "beyond-address-width"
    public var description: String { rawValue }
}

/// One entry of the fault log.
public struct DMAFault: Error, Equatable, Sendable, Codable, CustomStringConvertible {
    public var requester: RequesterID
    public var domain: UInt16?
    public var iova: UInt64
    public var access: DMAAccess
    public var reason: DMAFaultReason

    public var description: String {
        "DMA \(access) by \(requester)\(domain.map { " (domain \($0))" } ?? "") at IOVA 0x\(String(iova, radix: 16)): \(reason)"
    }
}

/// Invalidation commands (VT-d's invalidation-queue descriptors, simplified). The VMM
/// issues one after changing a context or page table, since the IOTLB may hold the old
/// translation.
public enum IOMMUInvalidation: Sendable, Equatable {
    case global
    case domain(UInt16)
    /// The pages of `domain` overlapping `[iova, iova+length)`.
    case pages(domain: UInt16, iova: UInt64, length: UInt64)
}

/// The IOMMU's throughput, for the translation budget: a translation occupies it for
/// `1 / translationsPerSecond`, an IOTLB miss (a page walk) for `missNanoseconds` more.
public struct TranslationBudget: Equatable, Sendable, Codable {
    public var translationsPerSecond: Double
    public var missNanoseconds: Double

    public init(translationsPerSecond: Double, missNanoseconds: Double) {
        precondition(translationsPerSecond > 0 && missNanoseconds >= 0, "a budget is positive")
        self.translationsPerSecond = translationsPerSecond
        self.missNanoseconds = missNanoseconds
    }

    /// Seconds the IOMMU is busy for this many translations and misses.
    public func busySeconds(translations: UInt64, misses: UInt64) -> Double {
        Double(translations) / translationsPerSecond + Double(misses) * missNanoseconds / 1e9
    }
}

public struct IOMMUCounters: Equatable, Sendable, Codable {
    public var translations: UInt64 = 0
    public var hits: UInt64 = 0
    public var misses: UInt64 = 0
    /// Page-table entries read by walks.
    public var walkReads: UInt64 = 0
    /// Bytes the successful translations covered.
    public var bytes: UInt64 = 0
    public var faults: UInt64 = 0

    public var missRate: Double { translations == 0 ? 0 : Double(misses) / Double(translations) }
}

/// How the IOMMU is built.
public struct IOMMUConfiguration: Sendable, Equatable {
    public var iotlbEntries: Int = 64
    public var replacement: IOTLBReplacement = .lru
    public var faultLogCapacity: Int = 256
    public var budget = TranslationBudget(translationsPerSecond: 50e6, missNanoseconds: 400)
    public init() {}
}

public enum IOMMUError: Error, Equatable, Sendable, CustomStringConvertible {
    case domainExists(UInt16)
    case noSuchDomain(UInt16)
    case pageTable(IOPageTableError)

    public var description: String {
        switch self {
        case let .domainExists(d): return "IOMMU domain \(d) exists already"
        case let .noSuchDomain(d): return "IOMMU domain \(d) does not exist"
        case let .pageTable(e): return e.description
        }
    }
}

/// A VT-d-like IOMMU: a context table maps each device function to a domain, each
/// domain has an I/O page table, an IOTLB caches translations, refused DMAs go to a
/// bounded fault log and to the VMM's fault handler.
///
/// Off (`isEnabled == false`) every device address is used as a host-physical address:
/// what a platform without an IOMMU does.
public final class IOMMU: Sendable {
    /// A translated piece: host-physical address and bytes of the request it covers.
    public struct Translation: Equatable, Sendable {
        public var hostAddress: UInt64
        public var length: Int
    }

    private struct State {
        var enabled = true
        var contexts: [RequesterID: UInt16] = [:]
        var domains: [UInt16: IOPageTable] = [:]
        var iotlb: IOTLB
        var faultLog: [DMAFault] = []
        var faultsLost: UInt64 = 0
        var counters = IOMMUCounters()
    }

    public let configuration: IOMMUConfiguration
    private let state: Mutex<State>
    private let faultHandler = LockedFunction<@Sendable (DMAFault) -> Void>()

    public init(configuration: IOMMUConfiguration = IOMMUConfiguration()) {
        precondition(configuration.faultLogCapacity > 0, "the fault log holds at least one fault")
        self.configuration = configuration
        state = Mutex(State(iotlb: IOTLB(capacity: configuration.iotlbEntries, replacement: configuration.replacement)))
    }

    /// Translation on (the default) or off (device addresses are host-physical).
    public var isEnabled: Bool {
        get { state.withLock { $0.enabled } }
        set { state.withLock { $0.enabled = newValue } }
    }

    /// Called (on the DMA's thread) for every fault, as VT-d's fault event interrupt.
    public func setFaultHandler(_ handler: (@Sendable (DMAFault) -> Void)?) { faultHandler.set(handler) }

    public func createDomain(_ id: UInt16) throws(IOMMUError) {
        try state.withLock { (s: inout State) throws(IOMMUError) in
            guard s.domains[id] == nil else { throw .domainExists(id) }
            s.domains[id] = IOPageTable()
        }
    }

    /// Changes domain `id`'s page table. Invalidate the IOTLB after removing mappings.
    public func updateDomain<R>(_ id: UInt16, _ body: (inout IOPageTable) throws(IOPageTableError) -> R) throws(IOMMUError) -> R {
        try state.withLock { (s: inout State) throws(IOMMUError) -> R in
            guard var table = s.domains[id] else { throw .noSuchDomain(id) }
            defer { s.domains[id] = table }
            do throws(IOPageTableError) { return try body(&table) } catch { throw .pageTable(error) }
        }
    }

    /// Context entry: `requester`'s DMA goes through `domain` from now on.
    public func attach(_ requester: RequesterID, to domain: UInt16) throws(IOMMUError) {
        try state.withLock { (s: inout State) throws(IOMMUError) in
            guard s.domains[domain] != nil else { throw .noSuchDomain(domain) }
            s.contexts[requester] = domain
        }
    }

    /// Clears `requester`'s context entry: its DMA faults from now on.
    public func detach(_ requester: RequesterID) { state.withLock { _ = $0.contexts.removeValue(forKey: requester) } }

    public func domain(of requester: RequesterID) -> UInt16? { state.withLock { $0.contexts[requester] } }

    /// Runs an invalidation command; returns the IOTLB entries dropped.
    @discardableResult
    public func invalidate(_ command: IOMMUInvalidation) -> Int {
        state.withLock { s in
            switch command {
            case .global:
                return s.iotlb.invalidate { _ in true }
            case let .domain(d):
                return s.iotlb.invalidate { $0.domain == d }
            case let .pages(d, iova, length):
                return s.iotlb.invalidate { e in
                    let base = e.pageNumber << UInt64(e.page.shift)
                    return e.domain == d && base < iova &+ length && iova < base &+ e.page.bytes
                }
            }
        }
    }

    /// Translates the first piece of a DMA of `length` bytes at `iova`: the returned
    /// translation covers up to the end of the page holding `iova`.
    public func translate(_ requester: RequesterID, iova: UInt64, length: Int, access: DMAAccess) -> Result<Translation, DMAFault> {
        let result: Result<Translation, DMAFault> = state.withLock { s in
            guard s.enabled else { return .success(Translation(hostAddress: iova, length: length)) }
            s.counters.translations += 1
            guard let domain = s.contexts[requester] else {
                return .failure(Self.record(&s, DMAFault(requester: requester, domain: nil, iova: iova, access: access, reason: .contextNotPresent), capacity: configuration.faultLogCapacity))
            }
            guard iova >> UInt64(IOPageTable.addressWidth) == 0 else {
                return .failure(Self.record(&s, DMAFault(requester: requester, domain: domain, iova: iova, access: access, reason: .beyondAddressWidth), capacity: configuration.faultLogCapacity))
            }
            let entry: IOTLBEntry
            if let cached = s.iotlb.lookup(domain: domain, iova: iova) {
                s.counters.hits += 1
                entry = cached
            } else {
                s.counters.misses += 1
                let walk = s.domains[domain]?.walk(iova) ?? IOPageTable.Walk(pageBase: nil, page: .size4K, permissions: [], entriesRead: 0)
                s.counters.walkReads += UInt64(walk.entriesRead)
                guard let base = walk.pageBase else {
                    return .failure(Self.record(&s, DMAFault(requester: requester, domain: domain, iova: iova, access: access, reason: .pageNotPresent), capacity: configuration.faultLogCapacity))
                }
                entry = IOTLBEntry(domain: domain, page: walk.page, pageNumber: iova >> UInt64(walk.page.shift),
                                   hostBase: base, permissions: walk.permissions)
                s.iotlb.insert(entry)
            }
            guard entry.permissions.contains(access.permission) else {
                return .failure(Self.record(&s, DMAFault(requester: requester, domain: domain, iova: iova, access: access,
                                                         reason: access == .read ? .readDenied : .writeDenied), capacity: configuration.faultLogCapacity))
            }
            let offset = iova & (entry.page.bytes - 1)
            let covered = Int(min(UInt64(length), entry.page.bytes - offset))
            s.counters.bytes += UInt64(covered)
            return .success(Translation(hostAddress: entry.hostBase + offset, length: covered))
        }
        if case let .failure(fault) = result, let handler = faultHandler.function { handler(fault) }
        return result
    }

    private static func record(_ s: inout State, _ fault: DMAFault, capacity: Int) -> DMAFault {
        s.counters.faults += 1
        if s.faultLog.count < capacity { s.faultLog.append(fault) } else { s.faultsLost += 1 }
        return fault
    }

    /// The fault log (oldest first) and how many faults did not fit.
    public var faultLog: (faults: [DMAFault], lost: UInt64) { state.withLock { ($0.faultLog, $0.faultsLost) } }

    /// Empties the fault log (the VMM has read it).
    public func clearFaultLog() { state.withLock { $0.faultLog = []; $0.faultsLost = 0 } }

    public var counters: IOMMUCounters { state.withLock { $0.counters } }
    public func resetCounters() { state.withLock { $0.counters = IOMMUCounters() } }
    /// Translations the IOTLB holds now.
    public var iotlbCount: Int { state.withLock { $0.iotlb.count } }
}
