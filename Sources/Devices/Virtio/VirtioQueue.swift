import Synchronization
import VirtCore

/// A guest-physical byte range named by one descriptor.
public struct GuestBuffer: Hashable, Sendable, CustomStringConvertible {
    public var address: UInt64
    public var length: Int

    public init(address: UInt64, length: Int) {
        self.address = address
        self.length = length
    }

    public var description: String { "0x\(String(address, radix: 16))+\(length)" }

    /// The pieces of `buffers` (taken as one contiguous byte stream) that cover
    /// `offset ..< offset+count`, clipped to what the buffers hold.
    public static func segments(of buffers: [GuestBuffer], offset: Int, count: Int) -> [GuestBuffer] {
        guard offset >= 0, count > 0 else { return [] }
        var result: [GuestBuffer] = []
        var skip = offset
        var remaining = count
        for b in buffers where remaining > 0 {
            if skip >= b.length { skip -= b.length; continue }
            let n = min(b.length - skip, remaining)
            // Wrapping add: for validated buffers it never wraps; for arbitrary ones a
            // wrapped address simply fails the later bounds-checked access.
            result.append(GuestBuffer(address: b.address &+ UInt64(skip), length: n))
            remaining -= n
            skip = 0
        }
        return result
    }
}

/// A validated descriptor chain: every buffer lies in guest RAM, the device-readable
/// buffers all precede the device-writable ones, and the total length is bounded.
///
/// The addresses and lengths were copied out of the descriptor table once, so a guest
/// rewriting the table while the device works cannot make the device use an address it
/// did not validate.
public struct DescriptorChain: Equatable, Sendable {
    /// Index of the first descriptor: what goes back into the used ring.
    public let head: UInt16
    /// Device-readable buffers (driver → device), in chain order.
    public let readable: [GuestBuffer]
    /// Device-writable buffers (device → driver), in chain order.
    public let writable: [GuestBuffer]
    public let readableLength: Int
    public let writableLength: Int

    public init(head: UInt16, readable: [GuestBuffer], writable: [GuestBuffer]) {
        self.head = head
        self.readable = readable
        self.writable = writable
        self.readableLength = readable.reduce(0) { $0 + $1.length }
        self.writableLength = writable.reduce(0) { $0 + $1.length }
    }

    /// Gathers up to `count` device-readable bytes starting `offset` bytes into the chain.
    public func readableBytes(in memory: GuestMemory, offset: Int = 0, count: Int = .max) throws(GuestMemoryError) -> [UInt8] {
        let n = max(0, min(count, readableLength - offset))
        var out: [UInt8] = []
        out.reserveCapacity(n)
        for s in GuestBuffer.segments(of: readable, offset: offset, count: n) {
            out += try memory.read(at: s.address, count: s.length)
        }
        return out
    }

    /// Scatters `bytes` into the device-writable buffers starting `offset` bytes in.
    /// Returns how many bytes fitted (the rest is dropped; callers check sizes first).
    @discardableResult
    public func writeWritable(_ bytes: [UInt8], at offset: Int = 0, in memory: GuestMemory) throws(GuestMemoryError) -> Int {
        var done = 0
        for s in GuestBuffer.segments(of: writable, offset: offset, count: bytes.count) {
            try memory.write(bytes[done ..< done + s.length], at: s.address)
            done += s.length
        }
        return done
    }
}

/// Which part of a split virtqueue an address belongs to.
public enum VirtqueueRing: String, Sendable {
    case descriptorTable = "descriptor table"
    case availableRing = "available ring"
    case usedRing = "used ring"

    /// The alignment the spec requires (2.7): 16, 2 and 4 bytes.
    public var alignment: UInt64 {
        switch self {
        case .descriptorTable: return 16
        case .availableRing: return 2
        case .usedRing: return 4
        }
    }
}

/// Why a chain the driver offered could not be used although the chain itself is
/// well-formed. The device completes such a request with an error and carries on.
public enum ChainFault: Equatable, Sendable {
    case bufferOutsideMemory(GuestBuffer)
    case tooLarge(bytes: UInt64, limit: Int)
    /// A device-readable descriptor (at `index`) follows a device-writable one.
    case writableBeforeReadable(index: UInt16)
}

/// What can go wrong reading or writing a split virtqueue.
///
/// `badRequest` concerns one request only: the chain has been consumed and must be
/// completed (see `VirtioQueue.nextChain`). Every other case means the rings themselves
/// are inconsistent, so the device cannot know which buffers the driver meant; the
/// transport then sets DEVICE_NEEDS_RESET.
public enum VirtqueueError: VirtioFault, Equatable {
    case notReady
    /// The driver changed a ready queue's size or addresses.
    case changedWhileReady
    case invalidSize(UInt16, max: UInt16)
    case misaligned(VirtqueueRing, address: UInt64)
    case ringOutsideMemory(VirtqueueRing, address: UInt64, length: Int)
    /// The driver's avail idx is more than a queue's worth ahead of what the device has
    /// consumed: it cannot be a valid ring state.
    case availIndexJump(previous: UInt16, current: UInt16, size: UInt16)
    case headOutOfRange(head: UInt16, size: UInt16)
    case nextOutOfRange(head: UInt16, index: UInt16, next: UInt16, size: UInt16)
    /// The chain has more descriptors than the queue: it must revisit one (a loop).
    case descriptorLoop(head: UInt16, size: UInt16)
    /// VIRTQ_DESC_F_INDIRECT without VIRTIO_F_INDIRECT_DESC having been offered.
    case indirectDescriptor(head: UInt16, index: UInt16)
    /// One request is unusable; `lastWritable` is its final descriptor when that one is
    /// device-writable, non-empty and inside RAM (where a block status byte would go).
    case badRequest(head: UInt16, ChainFault, lastWritable: GuestBuffer?)
    /// Host-side misuse: `addUsed` with a head the queue cannot have handed out.
    case usedHeadOutOfRange(head: UInt16, size: UInt16)

    public var kind: String {
        switch self {
        case .notReady: return "queueNotReady"
        case .changedWhileReady: return "queueChangedWhileReady"
        case .invalidSize: return "invalidQueueSize"
        case .misaligned: return "misalignedRing"
        case .ringOutsideMemory: return "ringOutsideMemory"
        case .availIndexJump: return "availIndexJump"
        case .headOutOfRange: return "headOutOfRange"
        case .nextOutOfRange: return "nextOutOfRange"
        case .descriptorLoop: return "descriptorLoop"
        case .indirectDescriptor: return "indirectDescriptor"
        case .badRequest(_, .bufferOutsideMemory, _): return "bufferOutsideMemory"
        case .badRequest(_, .tooLarge, _): return "chainTooLarge"
        case .badRequest(_, .writableBeforeReadable, _): return "writableBeforeReadable"
        case .usedHeadOutOfRange: return "usedHeadOutOfRange"
        }
    }

    /// True when only the request at `head` is affected.
    public var isRequestFault: Bool {
        if case .badRequest = self { return true }
        return false
    }

    public var description: String {
        switch self {
        case .notReady:
            return "queue used before it was made ready"
        case .changedWhileReady:
            return "queue size or address written while the queue is ready"
        case let .invalidSize(n, max):
            return "queue size \(n) is not a power of two in 1...\(max)"
        case let .misaligned(ring, address):
            return "\(ring.rawValue) at 0x\(String(address, radix: 16)) is misaligned"
        case let .ringOutsideMemory(ring, address, length):
            return "\(ring.rawValue) at 0x\(String(address, radix: 16))+\(length) is outside guest RAM"
        case let .availIndexJump(previous, current, size):
            return "avail idx moved from \(previous) to \(current), more than the queue size \(size)"
        case let .headOutOfRange(head, size):
            return "available ring names descriptor \(head), queue size is \(size)"
        case let .nextOutOfRange(head, index, next, size):
            return "chain \(head): descriptor \(index) links to \(next), queue size is \(size)"
        case let .descriptorLoop(head, size):
            return "chain \(head) is longer than the queue size \(size) (descriptor loop)"
        case let .indirectDescriptor(head, index):
            return "chain \(head): descriptor \(index) is indirect, but VIRTIO_F_INDIRECT_DESC was not offered"
        case let .badRequest(head, .bufferOutsideMemory(buffer), _):
            return "chain \(head): buffer \(buffer) is outside guest RAM"
        case let .badRequest(head, .tooLarge(bytes, limit), _):
            return "chain \(head): \(bytes) bytes exceed the per-request limit of \(limit)"
        case let .badRequest(head, .writableBeforeReadable(index), _):
            return "chain \(head): device-readable descriptor \(index) follows a device-writable one"
        case let .usedHeadOutOfRange(head, size):
            return "device returned descriptor \(head) on a queue of size \(size)"
        }
    }
}

/// One split virtqueue (virtio 1.x spec 2.7) as the device sees it: where the driver put
/// the three parts, and the device's own two counters.
///
/// A value type: the transport owns the queues and lends one `inout` to the device while
/// holding its lock, so queue state is never shared between threads unsynchronised.
/// Every value read from guest memory is treated as hostile.
/// A queue's traffic counters.
public struct VirtqueueTraffic: Sendable, Equatable {
    /// Driver notifications (QueueNotify writes or their ioeventfd) the queue was processed for.
    public var notifications: UInt64 = 0
    /// Chains taken from the available ring.
    public var chains: UInt64 = 0
    /// Device-readable bytes of those chains (driver → device).
    public var bytesToDevice: UInt64 = 0
    /// Used lengths returned (device → driver).
    public var bytesToDriver: UInt64 = 0
}

public struct VirtioQueue: Sendable {
    /// The spec's upper bound for a split queue.
    public static let absoluteMaxSize: UInt16 = 32768
    /// Default bound on the bytes one chain may describe.
    public static let defaultMaxChainBytes = 64 << 20

    /// Position of this queue on its device (for messages).
    public let index: Int
    /// QueueNumMax: the largest size this device accepts.
    public let maxSize: UInt16
    /// QueueNum: the size the driver chose (defaults to `maxSize`); set with `trySetSize`.
    public private(set) var size: UInt16
    /// Ring addresses, set with `trySetAddress` (validated against RAM when enabled).
    public private(set) var descriptorTable: UInt64 = 0
    public private(set) var availableRing: UInt64 = 0
    public private(set) var usedRing: UInt64 = 0
    /// QueueReady. Set through `enable(in:)` so the layout is validated first.
    public private(set) var isReady = false
    /// Requests describing more bytes than this are refused.
    public var maxChainBytes: Int
    /// When set, the device's accesses go through the IOMMU as this function: buffer
    /// addresses are IOVAs, translated (and confined to the VM's RAM) when a chain is
    /// taken; the rings must translate to themselves. Kept across device reset.
    public var dma: DeviceDMA?

    /// The next available-ring entry the device will consume (free-running, wraps).
    public private(set) var lastAvailIndex: UInt16 = 0
    /// The used idx the device last published (free-running, wraps).
    public private(set) var usedIndex: UInt16 = 0
    /// Used entries were added since the transport last looked.
    private var usedSinceCheck = false
    /// What went through the queue since it was created (kept across resets; for metrics).
    public private(set) var traffic = VirtqueueTraffic()

    public init(index: Int = 0, maxSize: UInt16, maxChainBytes: Int = VirtioQueue.defaultMaxChainBytes) {
        precondition(maxSize > 0 && maxSize <= Self.absoluteMaxSize && maxSize & (maxSize - 1) == 0,
                     "a queue's maximum size must be a power of two up to 32768")
        self.index = index
        self.maxSize = maxSize
        self.size = maxSize
        self.maxChainBytes = maxChainBytes
    }

    /// Back to the state after device reset (spec 2.4): not ready, addresses and counters 0.
    public mutating func reset() {
        size = maxSize
        descriptorTable = 0
        availableRing = 0
        usedRing = 0
        isReady = false
        lastAvailIndex = 0
        usedIndex = 0
        usedSinceCheck = false
    }

    // Ring geometry (spec 2.7): 16-byte descriptors; avail = flags, idx, ring[size],
    // used_event; used = flags, idx, ring[size] of {id u32, len u32}, avail_event.
    static func descriptorTableBytes(_ size: UInt16) -> Int { 16 * Int(size) }
    static func availableRingBytes(_ size: UInt16) -> Int { 6 + 2 * Int(size) }
    static func usedRingBytes(_ size: UInt16) -> Int { 6 + 8 * Int(size) }

    /// Checks size, alignment and that all three parts lie in RAM.
    public func validateLayout(in memory: GuestMemory) throws(VirtqueueError) {
        guard size > 0, size <= maxSize, size & (size - 1) == 0 else { throw .invalidSize(size, max: maxSize) }
        let parts: [(VirtqueueRing, UInt64, Int, UInt64)] = [
            (.descriptorTable, descriptorTable, Self.descriptorTableBytes(size), 16),
            (.availableRing, availableRing, Self.availableRingBytes(size), 2),
            (.usedRing, usedRing, Self.usedRingBytes(size), 4),
        ]
        for (ring, address, length, alignment) in parts {
            guard address % alignment == 0 else { throw .misaligned(ring, address: address) }
            guard memory.contains(address, length: length) else {
                throw .ringOutsideMemory(ring, address: address, length: length)
            }
            if let dma {
                let access: DMAAccess = ring == .usedRing ? .write : .read
                let translated = try? dma.guestBuffers(iova: address, length: length, access: access, in: memory)
                guard translated == [GuestBuffer(address: address, length: length)] else {
                    throw .ringOutsideMemory(ring, address: address, length: length)
                }
            }
        }
    }

    /// QueueNum ← `newSize`: a power of two up to `maxSize`, while the queue is not ready.
    public mutating func trySetSize(_ newSize: UInt16) throws(VirtqueueError) {
        guard !isReady else { throw .changedWhileReady }
        guard newSize > 0, newSize <= maxSize, newSize & (newSize - 1) == 0 else { throw .invalidSize(newSize, max: maxSize) }
        size = newSize
    }

    /// Sets one ring's guest-physical address, while the queue is not ready; the alignment
    /// the spec requires is checked now, the placement in RAM when the queue is enabled.
    /// (`checkAlignment: false` for a register interface that writes an address in halves.)
    public mutating func trySetAddress(_ ring: VirtqueueRing, _ address: UInt64, checkAlignment: Bool = true) throws(VirtqueueError) {
        guard !isReady else { throw .changedWhileReady }
        guard !checkAlignment || address % ring.alignment == 0 else { throw .misaligned(ring, address: address) }
        switch ring {
        case .descriptorTable: descriptorTable = address
        case .availableRing: availableRing = address
        case .usedRing: usedRing = address
        }
    }

    /// QueueReady ← 1: validates the layout, then starts both counters at 0.
    public mutating func enable(in memory: GuestMemory) throws(VirtqueueError) {
        try validateLayout(in: memory)
        lastAvailIndex = 0
        usedIndex = 0
        usedSinceCheck = false
        isReady = true
    }

    /// QueueReady ← 0: the device stops using the queue; the layout is kept.
    public mutating func disable() { isReady = false }

    /// Counts one driver notification.
    public mutating func countNotification() { traffic.notifications &+= 1 }

    /// What a snapshot keeps of a queue: the driver's layout and the device's positions.
    public struct SavedState: Codable, Sendable, Equatable {
        public var size: UInt16
        public var descriptorTable: UInt64, availableRing: UInt64, usedRing: UInt64
        public var isReady: Bool
        public var lastAvailIndex: UInt16, usedIndex: UInt16
    }

    public var savedState: SavedState {
        SavedState(size: size, descriptorTable: descriptorTable, availableRing: availableRing, usedRing: usedRing,
                   isReady: isReady, lastAvailIndex: lastAvailIndex, usedIndex: usedIndex)
    }

    /// Takes a saved state back (validating the layout of a ready queue against `memory`).
    public mutating func restore(_ saved: SavedState, in memory: GuestMemory) throws(VirtqueueError) {
        size = saved.size
        descriptorTable = saved.descriptorTable
        availableRing = saved.availableRing
        usedRing = saved.usedRing
        if saved.isReady { try validateLayout(in: memory) }
        isReady = saved.isReady
        lastAvailIndex = saved.lastAvailIndex
        usedIndex = saved.usedIndex
        usedSinceCheck = false
    }

    private func load<T: FixedWidthInteger>(_: T.Type, _ ring: VirtqueueRing, _ address: UInt64, in memory: GuestMemory) throws(VirtqueueError) -> T {
        do { return try memory.load(T.self, at: address) } catch {
            throw .ringOutsideMemory(ring, address: address, length: MemoryLayout<T>.size)
        }
    }

    private func store<T: FixedWidthInteger>(_ value: T, _ ring: VirtqueueRing, _ address: UInt64, in memory: GuestMemory) throws(VirtqueueError) {
        do { try memory.store(value, at: address) } catch {
            throw .ringOutsideMemory(ring, address: address, length: MemoryLayout<T>.size)
        }
    }

    /// The driver's avail idx, validated against what the device has consumed. Returns
    /// how many entries are waiting.
    public func availableCount(in memory: GuestMemory) throws(VirtqueueError) -> Int {
        guard isReady else { throw .notReady }
        let availIdx = try load(UInt16.self, .availableRing, availableRing &+ 2, in: memory)
        // Entries are published before idx (spec 2.7.13); read them only after idx.
        atomicMemoryFence(ordering: .acquiring)
        let pending = availIdx &- lastAvailIndex
        guard pending <= size else {
            throw .availIndexJump(previous: lastAvailIndex, current: availIdx, size: size)
        }
        return Int(pending)
    }

    /// Takes the next chain from the available ring, or nil when the ring is empty.
    ///
    /// A `badRequest` error means the chain was consumed and must still be completed with
    /// `addUsed` (`nextChain` does that); any other error leaves the queue unusable until
    /// the device is reset.
    public mutating func popAvailable(from memory: GuestMemory) throws(VirtqueueError) -> DescriptorChain? {
        guard try availableCount(in: memory) > 0 else { return nil }
        let slot = UInt64(lastAvailIndex & (size - 1))
        let head = try load(UInt16.self, .availableRing, availableRing &+ 4 &+ 2 * slot, in: memory)
        guard head < size else { throw .headOutOfRange(head: head, size: size) }
        // Consumed from here on, whatever the chain holds: the driver gets it back through
        // the used ring even if it is unusable.
        lastAvailIndex &+= 1

        var readable: [GuestBuffer] = []
        var writable: [GuestBuffer] = []
        var total: UInt64 = 0
        var fault: ChainFault?
        var lastWritable: GuestBuffer?
        var index = head
        var count: UInt16 = 0
        while true {
            // A valid chain uses each descriptor at most once, so more than `size`
            // descriptors means the links form a loop.
            guard count < size else { throw .descriptorLoop(head: head, size: size) }
            count += 1
            let entry = descriptorTable &+ 16 &* UInt64(index)
            let address = try load(UInt64.self, .descriptorTable, entry, in: memory)
            let length = try load(UInt32.self, .descriptorTable, entry &+ 8, in: memory)
            let flags = try load(UInt16.self, .descriptorTable, entry &+ 12, in: memory)
            let next = try load(UInt16.self, .descriptorTable, entry &+ 14, in: memory)
            guard flags & VirtqDescriptorFlag.indirect == 0 else {
                throw .indirectDescriptor(head: head, index: index)
            }
            let buffer = GuestBuffer(address: address, length: Int(length))
            let isWritable = flags & VirtqDescriptorFlag.write != 0
            // Behind the IOMMU: the buffer's guest-physical pieces, nil when unreachable.
            let translated = dma.flatMap { try? $0.guestBuffers(iova: address, length: buffer.length, access: isWritable ? .write : .read, in: memory) }
            let inRAM = dma == nil ? memory.contains(address, length: buffer.length) : translated != nil
            lastWritable = isWritable && inRAM && length > 0 ? translated?.last ?? buffer : nil
            // After the first fault keep walking (to find the end of the chain and check
            // its structure) but stop collecting buffers.
            if fault == nil {
                total += UInt64(length)
                if !inRAM {
                    fault = .bufferOutsideMemory(buffer)
                } else if total > UInt64(maxChainBytes) {
                    fault = .tooLarge(bytes: total, limit: maxChainBytes)
                } else if isWritable {
                    if let translated { writable += translated } else { writable.append(buffer) }
                } else if !writable.isEmpty {
                    fault = .writableBeforeReadable(index: index)
                } else if let translated {
                    readable += translated
                } else {
                    readable.append(buffer)
                }
            }
            guard flags & VirtqDescriptorFlag.next != 0 else { break }
            guard next < size else { throw .nextOutOfRange(head: head, index: index, next: next, size: size) }
            index = next
        }
        if let fault { throw .badRequest(head: head, fault, lastWritable: lastWritable) }
        let chain = DescriptorChain(head: head, readable: readable, writable: writable)
        traffic.chains &+= 1
        traffic.bytesToDevice &+= UInt64(chain.readableLength)
        return chain
    }

    /// Returns chain `head` to the driver with `length` bytes written into its
    /// device-writable buffers.
    public mutating func addUsed(head: UInt16, length: UInt32, in memory: GuestMemory) throws(VirtqueueError) {
        guard isReady else { throw .notReady }
        guard head < size else { throw .usedHeadOutOfRange(head: head, size: size) }
        let slot = UInt64(usedIndex & (size - 1))
        let element = usedRing &+ 4 &+ 8 * slot
        try store(UInt32(head), .usedRing, element, in: memory)
        try store(length, .usedRing, element &+ 4, in: memory)
        // The element must be visible before the idx that publishes it (spec 2.7.8.2).
        atomicMemoryFence(ordering: .releasing)
        usedIndex &+= 1
        try store(usedIndex, .usedRing, usedRing &+ 2, in: memory)
        usedSinceCheck = true
        traffic.bytesToDriver &+= UInt64(length)
    }

    /// Like `popAvailable`, but a request-level fault is recorded, completed and skipped:
    /// `failRequest` may write an error status into the faulty chain's last writable
    /// buffer and returns the used length to report (0 when it wrote nothing). Only
    /// ring-level faults are thrown.
    public mutating func nextChain(
        from memory: GuestMemory, diagnostics: VirtioDiagnostics,
        failRequest: (_ lastWritable: GuestBuffer?) -> UInt32 = { _ in 0 }
    ) throws(VirtqueueError) -> DescriptorChain? {
        while true {
            do {
                return try popAvailable(from: memory)
            } catch {
                guard case let .badRequest(head, _, lastWritable) = error else { throw error }
                diagnostics.record(QueueFault(queue: index, error: error))
                try addUsed(head: head, length: failRequest(lastWritable), in: memory)
            }
        }
    }

    /// True once after used entries were added, if the driver has not suppressed
    /// interrupts (VIRTQ_AVAIL_F_NO_INTERRUPT; there is no event-idx here).
    public mutating func takeInterruptRequest(in memory: GuestMemory) -> Bool {
        guard usedSinceCheck else { return false }
        usedSinceCheck = false
        // Store→load fence: the used idx written above must be visible before the flags
        // are read, or a driver re-enabling interrupts while it re-checks the used ring
        // could miss this batch and never be woken (spec 2.7.7.2).
        atomicMemoryFence(ordering: .sequentiallyConsistent)
        let flags = (try? memory.load(UInt16.self, at: availableRing)) ?? 0
        return flags & VirtqAvailFlag.noInterrupt == 0
    }
}

/// A queue fault together with the queue it happened on.
public struct QueueFault: VirtioFault, Equatable {
    public let queue: Int
    public let error: VirtqueueError
    public var kind: String { error.kind }
    public var description: String { "queue \(queue): \(error.description)" }
}
