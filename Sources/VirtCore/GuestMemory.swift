import CHost
#if canImport(Glibc)
import Glibc
#endif

/// Why a guest-memory access was refused.
public enum GuestMemoryError: Error, Equatable, Sendable, CustomStringConvertible {
    case outOfRange(gpa: UInt64, length: Int, ramSize: UInt64)
    case allocationFailed(size: UInt64, errno: Int32)
    case invalidSize(UInt64)
    /// A host write to a frame a confidential VM owns (SEV-SNP: the RMP check faults).
    case guestOwned(gpa: UInt64)

    public var description: String {
        switch self {
        case let .outOfRange(gpa, length, ram):
            return "guest access of \(length) bytes at 0x\(String(gpa, radix: 16)) is outside RAM (0x\(String(ram, radix: 16)) bytes)"
        case let .allocationFailed(size, err):
            return "could not allocate \(size) bytes of guest RAM: \(String(cString: strerror(err)))"
        case let .invalidSize(size):
            return "guest RAM size \(size) must be a non-zero multiple of 4 KiB"
        case let .guestOwned(gpa):
            return "host write to 0x\(String(gpa, radix: 16)) refused: the page belongs to a confidential VM (reverse map)"
        }
    }
}

/// Guest RAM: one contiguous memfd-backed region starting at guest-physical address 0.
///
/// The memfd (rather than anonymous memory) lets later services — snapshots, page
/// deduplication, userfaultfd and migration — share or remap the same pages. All public
/// access is bounds-checked; engines in this package reach the raw pointer through
/// `package` API so the unsafe part stays inside the package.
// SAFETY: the mapping and fd are immutable; guest RAM is shared memory by design (vCPUs and devices access it concurrently, as hardware does).
public final class GuestMemory: @unchecked Sendable {
    public static let pageSize = 4096

    /// Bytes of RAM, from GPA 0.
    public let size: UInt64
    /// The memfd holding the RAM; stays open for the life of the object.
    public let fileDescriptor: Int32
    package let base: UnsafeMutableRawPointer
    /// Pages written through this object (not by vCPUs), while a service has it enabled.
    public let hostWrites: HostWriteLog
    /// Per frame, non-zero when a confidential VM owns it (SEV-SNP's reverse map, kept by
    /// the engine): host writes and device DMA through this object are refused there.
    /// Set once, before vCPUs run; nil for ordinary VMs.
    package private(set) var ownedFrames: UnsafePointer<UInt8>?

    package func guardOwnedFrames(_ frames: UnsafePointer<UInt8>) { ownedFrames = frames }

    /// Throws when `[gpa, gpa+length)` (in RAM) touches a frame a confidential VM owns.
    @inline(__always)
    func checkHostWrite(_ gpa: UInt64, _ length: Int) throws(GuestMemoryError) {
        guard let owned = ownedFrames, length > 0 else { return }
        for page in Int(gpa >> 12)...Int((gpa + UInt64(length) - 1) >> 12) where owned[page] != 0 {
            throw .guestOwned(gpa: max(gpa, UInt64(page) << 12))
        }
    }

    public init(size: UInt64, name: String = "swiftvisor-ram") throws(GuestMemoryError) {
        guard size > 0, size % UInt64(Self.pageSize) == 0 else { throw .invalidSize(size) }
        let fd = host_memfd_create(name)
        guard fd >= 0 else { throw .allocationFailed(size: size, errno: -fd) }
        guard ftruncate(fd, off_t(size)) == 0 else {
            let err = errno
            close(fd)
            throw .allocationFailed(size: size, errno: err)
        }
        guard let p = host_mmap_shared(fd, Int(size), 1) else {
            let err = errno
            close(fd)
            throw .allocationFailed(size: size, errno: err)
        }
        self.size = size
        self.fileDescriptor = fd
        self.base = p
        hostWrites = HostWriteLog(pageCount: Int(size) / Self.pageSize)
    }

    deinit {
        munmap(base, Int(size))
        close(fileDescriptor)
    }

    @inline(__always)
    public func contains(_ gpa: UInt64, length: Int) -> Bool {
        length >= 0 && gpa <= size && UInt64(length) <= size - gpa
    }

    @inline(__always)
    func check(_ gpa: UInt64, _ length: Int) throws(GuestMemoryError) {
        guard contains(gpa, length: length) else { throw .outOfRange(gpa: gpa, length: length, ramSize: size) }
    }

    /// Gives the pages of `[gpa, gpa+length)` back to the host (ballooning): they read as
    /// zeros afterwards and use no host memory until written again. Page-aligned.
    public func discard(gpa: UInt64, length: UInt64) throws(GuestMemoryError) {
        guard gpa % UInt64(Self.pageSize) == 0, length % UInt64(Self.pageSize) == 0 else {
            throw .outOfRange(gpa: gpa, length: Int(clamping: length), ramSize: size)
        }
        try check(gpa, Int(clamping: length))
        try checkHostWrite(gpa, Int(clamping: length))
        let rc = host_discard_range(fileDescriptor, base, gpa, length)
        if rc < 0 { throw .allocationFailed(size: length, errno: -rc) }
        hostWrites.note(gpa, Int(length))
    }

    /// Allocates host memory for all of RAM now rather than at each page's first touch (QEMU's
    /// `-mem-prealloc`): a migration destination or restore then writes into pages that
    /// exist, at copy speed, instead of paying the host's page allocation on the way.
    /// Contents are unchanged (zero). Call before the guest or any device uses the RAM.
    public func preallocate() throws(GuestMemoryError) {
        let rc = host_populate_range(base, 0, size)
        if rc < 0 { throw .allocationFailed(size: size, errno: -rc) }
    }

    /// Host memory the RAM's memfd holds now (pages never touched or discarded don't count).
    public var allocatedBytes: UInt64 { UInt64(max(0, host_allocated_bytes(fileDescriptor))) }

    /// Host pointer for `[gpa, gpa+length)`, or nil when the range is not all RAM.
    @inline(__always)
    package func hostPointer(_ gpa: UInt64, length: Int) -> UnsafeMutableRawPointer? {
        guard contains(gpa, length: length) else { return nil }
        if ownedFrames != nil {
            do throws(GuestMemoryError) { try checkHostWrite(gpa, length) } catch { return nil }
        }
        return base + Int(gpa)
    }

    /// Records a host write made through `hostPointer` (a device reading a file into guest RAM).
    @inline(__always)
    package func noteHostWrite(_ gpa: UInt64, length: Int) { hostWrites.note(gpa, length) }

    /// Reads a little-endian integer.
    @inline(__always)
    public func load<T: FixedWidthInteger>(_: T.Type = T.self, at gpa: UInt64) throws(GuestMemoryError) -> T {
        try check(gpa, MemoryLayout<T>.size)
        return T(littleEndian: (base + Int(gpa)).loadUnaligned(as: T.self))
    }

    /// Writes a little-endian integer.
    @inline(__always)
    public func store<T: FixedWidthInteger>(_ value: T, at gpa: UInt64) throws(GuestMemoryError) {
        try check(gpa, MemoryLayout<T>.size)
        try checkHostWrite(gpa, MemoryLayout<T>.size)
        (base + Int(gpa)).storeBytes(of: value.littleEndian, as: T.self)
        hostWrites.note(gpa, MemoryLayout<T>.size)
    }

    public func read(at gpa: UInt64, count: Int) throws(GuestMemoryError) -> [UInt8] {
        try check(gpa, count)
        return [UInt8](UnsafeRawBufferPointer(start: base + Int(gpa), count: count))
    }

    public func write<C: Collection>(_ bytes: C, at gpa: UInt64) throws(GuestMemoryError) where C.Element == UInt8 {
        try check(gpa, bytes.count)
        try checkHostWrite(gpa, bytes.count)
        let dst = UnsafeMutableRawBufferPointer(start: base + Int(gpa), count: bytes.count)
        _ = dst.copyBytes(from: bytes) as Void?
        hostWrites.note(gpa, bytes.count)
    }

    public func fill(_ byte: UInt8, at gpa: UInt64, count: Int) throws(GuestMemoryError) {
        try check(gpa, count)
        try checkHostWrite(gpa, count)
        memset(base + Int(gpa), Int32(byte), count)
        hostWrites.note(gpa, count)
    }

    /// Zeroes `[gpa, gpa+count)`: whole pages are discarded (they read as zeros and use no
    /// host memory, so zeroing untouched RAM costs nothing), partial pages are cleared.
    public func zero(at gpa: UInt64, count: Int) throws(GuestMemoryError) {
        try check(gpa, count)
        let page = UInt64(Self.pageSize)
        let end = gpa + UInt64(count)
        let firstWhole = (gpa + page - 1) / page * page, lastWhole = end / page * page
        guard firstWhole < lastWhole else { return try fill(0, at: gpa, count: count) }
        if gpa < firstWhole { try fill(0, at: gpa, count: Int(firstWhole - gpa)) }
        try discard(gpa: firstWhole, length: lastWhole - firstWhole)
        if lastWhole < end { try fill(0, at: lastWhole, count: Int(end - lastWhole)) }
    }

    /// Calls `body` with a read-only view of `[gpa, gpa+count)`.
    public func withBytes<R>(at gpa: UInt64, count: Int, _ body: (UnsafeRawBufferPointer) throws -> R) throws -> R {
        try check(gpa, count)
        return try body(UnsafeRawBufferPointer(start: base + Int(gpa), count: count))
    }

    /// FNV-1a 64 over all of RAM: a cheap fingerprint for differential tests.
    public func contentHash() -> UInt64 {
        var h: UInt64 = 0xcbf2_9ce4_8422_2325
        let words = base.assumingMemoryBound(to: UInt64.self)
        for i in 0..<Int(size / 8) {
            h = (h ^ words[i]) &* 0x100_0000_01b3
        }
        return h
    }
}
