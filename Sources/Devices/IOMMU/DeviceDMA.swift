import VirtCore

/// Why a device's DMA did not happen.
public enum DMAError: Error, Equatable, Sendable, CustomStringConvertible {
    /// The IOMMU refused it (and logged the fault).
    case translationFault(DMAFault)
    /// The address translated to host-physical memory nothing backs.
    case unbackedAddress(hostAddress: UInt64, length: Int)
    /// The address is host memory, but not the RAM of the VM the device serves (virtio's
    /// path, which reaches only its own VM's RAM).
    case outsideOwnVM(hostAddress: UInt64, owner: HostMemoryOwner)

    public var description: String {
        switch self {
        case let .translationFault(f): return "IOMMU fault: \(f)"
        case let .unbackedAddress(hpa, n): return "DMA of \(n) bytes at host-physical 0x\(String(hpa, radix: 16)) hits no memory"
        case let .outsideOwnVM(hpa, owner):
            return "DMA at host-physical 0x\(String(hpa, radix: 16)) reaches \(owner), not the device's VM"
        }
    }
}

/// One device function's DMA: every access is translated by the IOMMU (as that
/// function's requester ID) and lands in the host-physical space, page by page.
public struct DeviceDMA: Sendable {
    public let requester: RequesterID
    public let iommu: IOMMU
    public let space: HostPhysicalSpace

    public init(requester: RequesterID, iommu: IOMMU, space: HostPhysicalSpace) {
        self.requester = requester; self.iommu = iommu; self.space = space
    }

    /// A piece of a DMA: `length` bytes of `memory` at `offset`.
    public struct Segment {
        public let memory: GuestMemory
        public let offset: UInt64
        public let length: Int
        public let owner: HostMemoryOwner
        public let hostAddress: UInt64
    }

    /// Translates all of `[iova, iova+length)` into backed host memory, page by page.
    /// Nothing is accessed unless every page translates.
    public func segments(iova: UInt64, length: Int, access: DMAAccess) throws(DMAError) -> [Segment] {
        var result: [Segment] = []
        var done = 0
        while done < length {
            let address = iova &+ UInt64(done)
            let piece: IOMMU.Translation
            switch iommu.translate(requester, iova: address, length: length - done, access: access) {
            case let .success(t): piece = t
            case let .failure(f): throw .translationFault(f)
            }
            guard let region = space.region(containing: piece.hostAddress, length: piece.length) else {
                throw .unbackedAddress(hostAddress: piece.hostAddress, length: piece.length)
            }
            result.append(Segment(memory: region.memory, offset: piece.hostAddress - region.base, length: piece.length,
                                  owner: region.owner, hostAddress: piece.hostAddress))
            done += piece.length
        }
        return result
    }

    public func read(at iova: UInt64, count: Int) throws(DMAError) -> [UInt8] {
        var out: [UInt8] = []
        out.reserveCapacity(count)
        for s in try segments(iova: iova, length: count, access: .read) {
            // In range by construction: the region contains the segment.
            out += (try? s.memory.read(at: s.offset, count: s.length)) ?? []
        }
        return out
    }

    public func write<C: Collection>(_ bytes: C, at iova: UInt64) throws(DMAError) where C.Element == UInt8, C.Index == Int {
        var done = bytes.startIndex
        for s in try segments(iova: iova, length: bytes.count, access: .write) {
            try? s.memory.write(bytes[done ..< done + s.length], at: s.offset)
            done += s.length
        }
    }

    public func load<T: FixedWidthInteger>(_: T.Type, at iova: UInt64) throws(DMAError) -> T {
        let bytes = try read(at: iova, count: MemoryLayout<T>.size)
        return bytes.reversed().reduce(T(0)) { $0 << 8 | T($1) }
    }

    public func store<T: FixedWidthInteger>(_ value: T, at iova: UInt64) throws(DMAError) {
        try write((0..<MemoryLayout<T>.size).map { UInt8(truncatingIfNeeded: value >> (8 * $0)) }, at: iova)
    }

    /// For a device that works on its own VM's RAM by guest-physical address (the virtio
    /// devices): translates `[iova, iova+length)` and returns the guest-physical pieces,
    /// or throws when any page faults or leaves `vm`'s RAM.
    public func guestBuffers(iova: UInt64, length: Int, access: DMAAccess, in vm: GuestMemory) throws(DMAError) -> [GuestBuffer] {
        var buffers: [GuestBuffer] = []
        for s in try segments(iova: iova, length: length, access: access) {
            guard s.memory === vm else {
                throw .outsideOwnVM(hostAddress: s.hostAddress, owner: s.owner)
            }
            if let last = buffers.last, last.address + UInt64(last.length) == s.offset {
                buffers[buffers.count - 1].length += s.length
            } else {
                buffers.append(GuestBuffer(address: s.offset, length: s.length))
            }
        }
        return buffers
    }
}
