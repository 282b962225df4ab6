import Synchronization
import VirtCore

/// Who owns a range of host-physical memory.
public enum HostMemoryOwner: Hashable, Sendable, Codable, CustomStringConvertible {
    /// The RAM of a VM (by name).
    case virtualMachine(String)
    /// The VMM's own memory: its data structures, other VMs' metadata, secrets.
    case vmm

    public var description: String {
        switch self {
        case let .virtualMachine(name): return "VM \(name)"
        case .vmm: return "the VMM"
        }
    }
}

/// Why a host-physical range could not be placed.
public enum HostPhysicalSpaceError: Error, Equatable, Sendable, CustomStringConvertible {
    case misaligned(base: UInt64)
    case overlaps(base: UInt64, size: UInt64, existing: HostMemoryOwner)

    public var description: String {
        switch self {
        case let .misaligned(base):
            return "host-physical region at 0x\(String(base, radix: 16)) is not 1 GiB aligned"
        case let .overlaps(base, size, existing):
            return "host-physical region 0x\(String(base, radix: 16))+0x\(String(size, radix: 16)) overlaps \(existing)"
        }
    }
}

/// One backed range of host-physical addresses.
public struct HostPhysicalRegion: Sendable {
    public let base: UInt64
    public let owner: HostMemoryOwner
    public let memory: GuestMemory
    public var size: UInt64 { memory.size }
    public var end: UInt64 { base + memory.size }
}

/// The host-physical address space a DMA-capable device sees: every VM's RAM and the
/// VMM's own memory, each at a host-physical base. Device addresses become host-physical
/// addresses (through the IOMMU, or unchanged when it is off) and land in one region here.
///
/// Regions are 1 GiB aligned so the IOMMU's largest pages can map them.
public final class HostPhysicalSpace: Sendable {
    public static let regionAlignment: UInt64 = 1 << 30
    private let regions = Mutex<[HostPhysicalRegion]>([])

    public init() {}

    /// Places `memory` at host-physical `base`.
    @discardableResult
    public func add(_ memory: GuestMemory, at base: UInt64, owner: HostMemoryOwner) throws(HostPhysicalSpaceError) -> HostPhysicalRegion {
        guard base % Self.regionAlignment == 0 else { throw .misaligned(base: base) }
        let region = HostPhysicalRegion(base: base, owner: owner, memory: memory)
        return try regions.withLock { (list: inout [HostPhysicalRegion]) throws(HostPhysicalSpaceError) -> HostPhysicalRegion in
            if let clash = list.first(where: { base < $0.end && $0.base < region.end }) {
                throw .overlaps(base: base, size: memory.size, existing: clash.owner)
            }
            list.append(region)
            return region
        }
    }

    /// The region holding all of `[hpa, hpa+length)`, or nil.
    public func region(containing hpa: UInt64, length: Int) -> HostPhysicalRegion? {
        regions.withLock { list in
            list.first { hpa >= $0.base && $0.memory.contains(hpa - $0.base, length: length) }
        }
    }
}
