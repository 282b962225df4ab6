import Synchronization
import VirtCore

/// Counters a VMM can show for a memory balloon.
public struct VirtioBalloonStatistics: Equatable, Sendable {
    /// Pages the driver put into the balloon (accepted PFNs), since the device was created.
    public var inflatedPages: UInt64 = 0
    /// Pages the driver took back out of the balloon.
    public var deflatedPages: UInt64 = 0
    /// Bytes of guest RAM discarded for inflated pages (pages the host never backed are
    /// included: discarding them costs nothing and returns nothing).
    public var discardedBytes: UInt64 = 0
    /// Host memory the discards actually gave back: the drop of `GuestMemory.allocatedBytes`
    /// across each inflate request's discards (other vCPUs writing RAM meanwhile can make
    /// it read low, never high).
    public var returnedBytes: UInt64 = 0
    /// Inflate PFNs refused because the page lies (partly) outside RAM.
    public var rejectedOutsideRAM: UInt64 = 0
    /// Inflate PFNs refused because the page is in the VMM area (below `protectedBelow`).
    public var rejectedReserved: UInt64 = 0
    /// Inflate PFNs refused because the page is already in the balloon.
    public var rejectedDuplicates: UInt64 = 0
    /// Deflate PFNs that were not in the balloon (outside RAM included).
    public var rejectedNotInBalloon: UInt64 = 0
    /// Buffers taken from inflateq and deflateq.
    public var inflateRequests: UInt64 = 0
    public var deflateRequests: UInt64 = 0
    /// Statistics buffers the driver delivered on statsq.
    public var statisticsUpdates: UInt64 = 0
    /// Discards the host refused (fallocate/madvise failed): those pages stay backed.
    public var discardFailures: UInt64 = 0

    /// Every refused PFN, whatever the reason.
    public var rejectedPages: UInt64 {
        rejectedOutsideRAM + rejectedReserved + rejectedDuplicates + rejectedNotInBalloon
    }
}

/// The memory statistics a driver last reported on statsq (spec 5.5.6.3): tag → value.
public struct VirtioBalloonGuestStatistics: Equatable, Sendable {
    /// Tags of spec 5.5.6.3; memory values are in bytes.
    public enum Tag {
        public static let swapIn: UInt16 = 0
        public static let swapOut: UInt16 = 1
        public static let majorFaults: UInt16 = 2
        public static let minorFaults: UInt16 = 3
        public static let freeMemory: UInt16 = 4
        public static let totalMemory: UInt16 = 5
        public static let availableMemory: UInt16 = 6
        public static let diskCaches: UInt16 = 7
        public static let hugetlbAllocations: UInt16 = 8
        public static let hugetlbFailures: UInt16 = 9
    }

    public var values: [UInt16: UInt64]

    public init(values: [UInt16: UInt64] = [:]) { self.values = values }

    /// VIRTIO_BALLOON_S_MEMFREE: memory the guest does not use at all, in bytes.
    public var freeMemory: UInt64? { values[Tag.freeMemory] }
    /// VIRTIO_BALLOON_S_MEMTOT: memory the guest can use, in bytes.
    public var totalMemory: UInt64? { values[Tag.totalMemory] }
    /// VIRTIO_BALLOON_S_AVAIL: memory available for new work without swapping, in bytes.
    public var availableMemory: UInt64? { values[Tag.availableMemory] }
}

/// virtio-balloon (device ID 5, spec 5.5): the host asks the guest to give back memory.
///
/// Queues: inflateq 0 and deflateq 1 carry arrays of little-endian u32 page frame numbers
/// (4 KiB pages); statsq 2 is used when VIRTIO_BALLOON_F_STATS_VQ is negotiated.
/// Configuration space: `num_pages` (u32 at 0, device → driver: the size the host wants
/// the balloon to be) and `actual` (u32 at 4, driver → device: its size now).
///
/// Inflate: each PFN is checked (inside RAM, at or above `protectedBelow`, not already in
/// the balloon); accepted pages are discarded from guest RAM (`GuestMemory.discard`, in
/// coalesced runs), so the host really gets the memory back, and read as zeros when the
/// guest uses them again. Refused PFNs are counted in `statistics` and reported through
/// the transport's diagnostics (one fault per request and reason; the first of each
/// reason is logged); they never stop the device. Deflate is bookkeeping only.
///
/// Host convention (not part of the spec, understood by the bundled `balloon` guest): a
/// target of `quitTarget` (0xFFFF_FFFF) asks the guest to stop.
public final class VirtioBalloon: VirtioDevice {
    public static let inflateQueue = 0
    public static let deflateQueue = 1
    public static let statisticsQueue = 2
    /// VIRTIO_BALLOON_F_MUST_TELL_HOST (not offered: deflating needs no host action).
    public static let featureMustTellHost: UInt64 = 1 << 0
    /// VIRTIO_BALLOON_F_STATS_VQ: the driver reports memory statistics on statsq.
    public static let featureStatisticsQueue: UInt64 = 1 << 1
    /// The balloon's page size: PFNs count 4 KiB pages whatever the guest's page size.
    public static let pageSize: UInt64 = 4096
    /// Target meaning "guest, please stop" (Swiftvisor convention; see the type comment).
    public static let quitTarget: UInt32 = 0xFFFF_FFFF
    /// Bytes of one statsq entry: le16 tag, le64 value.
    static let statEntrySize = 10

    public let name: String
    public var deviceID: VirtioDeviceID { .balloon }
    public let offeredFeatures: UInt64
    public let queueMaxSizes: [UInt16]
    /// Pages below this guest-physical address are never discarded (the VMM's GDT, boot
    /// info, page tables and stacks live below 1 MiB).
    public let protectedBelow: UInt64

    private struct State {
        var target: UInt32
        var actual: UInt32 = 0
        /// One bit per 4 KiB page of RAM: set while the page is in the balloon. Sized on
        /// first use, when the device first sees guest memory.
        var ballooned: [UInt64] = []
        var balloonedCount = 0
        var stats = VirtioBalloonStatistics()
        var guestStats: VirtioBalloonGuestStatistics?
        /// The statsq chain the device holds until the host wants fresh numbers.
        var heldStatsHead: UInt16?
        var statsRequested = false
        /// Something the host may want to observe changed; `onChange` runs in
        /// `performDeferredWork`.
        var changed = false
        var transport = WeakTransport()

        func isBallooned(_ pfn: UInt64) -> Bool {
            let word = Int(pfn / 64)
            return word < ballooned.count && ballooned[word] & (1 << (pfn % 64)) != 0
        }

        mutating func setBallooned(_ pfn: UInt64, _ on: Bool) {
            let word = Int(pfn / 64), bit: UInt64 = 1 << (pfn % 64)
            if on { ballooned[word] |= bit } else { ballooned[word] &= ~bit }
            balloonedCount += on ? 1 : -1
        }
    }

    private let state: Mutex<State>
    private let onChange: @Sendable () -> Void

    /// - Parameters:
    ///   - target: the initial `num_pages` (the driver acts on it when it starts).
    ///   - statisticsQueue: offer VIRTIO_BALLOON_F_STATS_VQ.
    ///   - protectedBelow: lowest guest-physical address a PFN may name (default 1 MiB).
    ///   - onChange: called (without any lock held, on the thread that did the work) after
    ///     the driver inflated, deflated, wrote `actual` or reported statistics. It may
    ///     read this device and call `setTarget`, but not the transport's register
    ///     interface.
    public init(name: String = "virtio-balloon", target: UInt32 = 0, queueSize: UInt16 = 128,
                statisticsQueue: Bool = true, protectedBelow: UInt64 = 1 << 20,
                onChange: @escaping @Sendable () -> Void = {}) {
        self.name = name
        self.queueMaxSizes = [queueSize, queueSize, queueSize]
        self.offeredFeatures = statisticsQueue ? Self.featureStatisticsQueue : 0
        self.protectedBelow = (protectedBelow + Self.pageSize - 1) / Self.pageSize * Self.pageSize
        self.onChange = onChange
        self.state = Mutex(State(target: target))
    }

    // MARK: Host API (any thread)

    /// Asks the guest for a balloon of `pages` 4 KiB pages: updates `num_pages` and raises
    /// the configuration-change interrupt (once the driver is up). Must not be called
    /// from inside the transport (it takes the transport's lock).
    public func setTarget(pages: UInt32) {
        let transport = state.withLock { s -> (any VirtioTransportHandle)? in
            s.target = pages
            return s.transport.value
        }
        transport?.configurationChanged()
    }

    /// `num_pages`: the size the host asked for.
    public var targetPages: UInt32 { state.withLock { $0.target } }
    /// `actual` as the driver last wrote it.
    public var actualPages: UInt32 { state.withLock { $0.actual } }
    /// Pages the host's own bookkeeping has in the balloon (what was inflated and not
    /// deflated since the last reset); normally equal to `actualPages`.
    public var balloonedPages: Int { state.withLock { $0.balloonedCount } }

    /// For snapshots: target, actual and the ballooned-page bitmap (little-endian words).
    public func savedDeviceState() -> [UInt8] {
        state.withLock { s in
            var out: [UInt8] = []
            func put<T: FixedWidthInteger>(_ v: T) { withUnsafeBytes(of: v.littleEndian) { out += $0 } }
            put(s.target); put(s.actual); put(UInt32(s.ballooned.count))
            for w in s.ballooned { put(w) }
            return out
        }
    }

    public func restoreDeviceState(_ bytes: [UInt8]) throws {
        guard bytes.count >= 12 else { throw VirtioDeviceError(kind: "restoreBalloon", message: "balloon state is \(bytes.count) bytes, too short") }
        func get<T: FixedWidthInteger>(_: T.Type, _ at: Int) -> T {
            bytes[at..<(at + MemoryLayout<T>.size)].reversed().reduce(T(0)) { $0 << 8 | T($1) }
        }
        let words = Int(get(UInt32.self, 8))
        guard bytes.count == 12 + words * 8 else { throw VirtioDeviceError(kind: "restoreBalloon", message: "balloon state has the wrong length") }
        state.withLock { s in
            s.target = get(UInt32.self, 0)
            s.actual = get(UInt32.self, 4)
            s.ballooned = (0..<words).map { get(UInt64.self, 12 + $0 * 8) }
            s.balloonedCount = s.ballooned.reduce(0) { $0 + $1.nonzeroBitCount }
        }
    }
    public var statistics: VirtioBalloonStatistics { state.withLock { $0.stats } }
    /// The statistics the driver last reported (nil before the first statsq buffer).
    public var guestStatistics: VirtioBalloonGuestStatistics? { state.withLock { $0.guestStats } }

    /// Whether page frame `pfn` is in the balloon.
    public func isBallooned(pfn: UInt64) -> Bool { state.withLock { $0.isBallooned(pfn) } }

    /// Asks the driver for fresh statistics: returns the statsq buffer the device holds so
    /// the driver refills it (`guestStatistics` and `onChange` follow when it does). If
    /// the driver holds no buffer yet, the request waits for the next one.
    public func requestGuestStatistics() {
        let transport = state.withLock { s -> (any VirtioTransportHandle)? in
            s.statsRequested = true
            return s.transport.value
        }
        transport?.processQueue(Self.statisticsQueue)
    }

    // MARK: VirtioDevice

    public func configSpace() -> [UInt8] {
        let (target, actual) = state.withLock { ($0.target, $0.actual) }
        var c = ConfigWriter()
        c.put(target)  // num_pages
        c.put(actual)  // actual
        return c.bytes
    }

    public func writeConfig(offset: Int, bytes: [UInt8]) {
        // Only `actual` (offset 4..<8) is the driver's; any width, byte by byte.
        state.withLock { s in
            var value = s.actual
            for (i, byte) in bytes.enumerated() where (4..<8).contains(offset + i) {
                let shift = UInt32(8 * (offset + i - 4))
                value = (value & ~(0xFF << shift)) | (UInt32(byte) << shift)
            }
            if value != s.actual {
                s.actual = value
                s.changed = true
            }
        }
    }

    public func attach(to transport: any VirtioTransportHandle) {
        state.withLock { $0.transport = WeakTransport(value: transport) }
    }

    /// A reset driver starts over believing it owns all its memory (spec 5.5.6.1): the
    /// balloon is empty. Its pages were discarded and simply read as zeros. The host's
    /// target and the counters stay.
    public func reset() {
        state.withLock { s in
            for i in s.ballooned.indices { s.ballooned[i] = 0 }
            s.balloonedCount = 0
            if s.actual != 0 { s.changed = true }
            s.actual = 0
            s.heldStatsHead = nil
            s.statsRequested = false
        }
    }

    public func process(queue index: Int, _ queue: inout VirtioQueue, memory: GuestMemory,
                        diagnostics: VirtioDiagnostics) throws(VirtqueueError) {
        switch index {
        case Self.inflateQueue, Self.deflateQueue:
            while let chain = try queue.nextChain(from: memory, diagnostics: diagnostics) {
                handle(chain, inflate: index == Self.inflateQueue, memory, diagnostics)
                // Both queues carry device-readable buffers only: nothing written.
                try queue.addUsed(head: chain.head, length: 0, in: memory)
            }
        case Self.statisticsQueue:
            try processStatistics(&queue, memory, diagnostics)
        default:
            break
        }
    }

    public func performDeferredWork() {
        let changed = state.withLock { s -> Bool in
            defer { s.changed = false }
            return s.changed
        }
        if changed { onChange() }
    }

    // MARK: inflateq / deflateq

    private func fault(_ diagnostics: VirtioDiagnostics, _ kind: String, _ message: String) {
        diagnostics.record(VirtioDeviceError(kind: kind, message: message))
    }

    /// One inflate or deflate buffer: an array of u32 PFNs.
    private func handle(_ chain: DescriptorChain, inflate: Bool, _ memory: GuestMemory,
                        _ diagnostics: VirtioDiagnostics) {
        let what = inflate ? "inflate" : "deflate"
        let bytes: [UInt8]
        do { bytes = try chain.readableBytes(in: memory) } catch {
            // Unreachable for a validated chain; never crash on it all the same.
            fault(diagnostics, "guestMemory", error.description)
            return
        }
        if bytes.count % 4 != 0 {
            fault(diagnostics, "balloonPartialPFN",
                  "\(what) request \(chain.head): \(bytes.count) bytes is not a whole number of 32-bit PFNs; the last \(bytes.count % 4) ignored")
        }
        if !chain.writable.isEmpty {
            fault(diagnostics, "balloonWritableBuffer",
                  "\(what) request \(chain.head) has device-writable buffers; they are ignored")
        }
        var pfns: [UInt64] = []
        pfns.reserveCapacity(bytes.count / 4)
        for at in stride(from: 0, to: bytes.count - 3, by: 4) {
            pfns.append(Self.le(bytes, at, 4))
        }
        let ramPages = memory.size / Self.pageSize
        let firstAllowed = protectedBelow / Self.pageSize

        // Validate and do the bookkeeping under the lock; discard afterwards (still on
        // this thread, under the transport's lock, so requests stay ordered).
        var accepted: [UInt64] = []
        var outside: [UInt64] = [], reserved: [UInt64] = [], duplicate: [UInt64] = [], absent: [UInt64] = []
        state.withLock { s in
            let words = Int((ramPages + 63) / 64)
            if s.ballooned.count != words { s.ballooned = [UInt64](repeating: 0, count: words); s.balloonedCount = 0 }
            for pfn in pfns {
                if inflate {
                    if pfn >= ramPages { outside.append(pfn); continue }
                    if pfn < firstAllowed { reserved.append(pfn); continue }
                    if s.isBallooned(pfn) { duplicate.append(pfn); continue }
                    s.setBallooned(pfn, true)
                } else {
                    guard pfn < ramPages, s.isBallooned(pfn) else { absent.append(pfn); continue }
                    s.setBallooned(pfn, false)
                }
                accepted.append(pfn)
            }
            if inflate {
                s.stats.inflateRequests += 1
                s.stats.inflatedPages += UInt64(accepted.count)
                s.stats.rejectedOutsideRAM += UInt64(outside.count)
                s.stats.rejectedReserved += UInt64(reserved.count)
                s.stats.rejectedDuplicates += UInt64(duplicate.count)
            } else {
                s.stats.deflateRequests += 1
                s.stats.deflatedPages += UInt64(accepted.count)
                s.stats.rejectedNotInBalloon += UInt64(absent.count)
            }
            s.changed = true
        }
        func report(_ list: [UInt64], _ kind: String, _ why: String) {
            guard let first = list.first else { return }
            fault(diagnostics, kind, "\(what) request \(chain.head): \(list.count) PFN\(list.count == 1 ? "" : "s") \(why) (first: 0x\(String(first, radix: 16))); ignored")
        }
        report(outside, "balloonPFNOutsideRAM", "outside the \(memory.size >> 20) MiB of RAM")
        report(reserved, "balloonPFNReserved", "below 0x\(String(protectedBelow, radix: 16)), the VMM's area")
        report(duplicate, "balloonPFNDuplicate", "already in the balloon")
        report(absent, "balloonPFNNotInBalloon", "not in the balloon")

        if inflate, !accepted.isEmpty { discard(accepted, memory, diagnostics) }
    }

    /// Gives the pages back to the host, one `discard` per contiguous run.
    private func discard(_ pfns: [UInt64], _ memory: GuestMemory, _ diagnostics: VirtioDiagnostics) {
        let sorted = pfns.sorted()
        let before = memory.allocatedBytes
        var discarded: UInt64 = 0, failures: UInt64 = 0
        var i = 0
        while i < sorted.count {
            var j = i + 1
            while j < sorted.count, sorted[j] == sorted[j - 1] + 1 { j += 1 }
            let gpa = sorted[i] * Self.pageSize, length = UInt64(j - i) * Self.pageSize
            do {
                try memory.discard(gpa: gpa, length: length)
                discarded += length
            } catch {
                failures += 1
                fault(diagnostics, "balloonDiscardFailed",
                      "could not give 0x\(String(gpa, radix: 16))+0x\(String(length, radix: 16)) back to the host: \(error.description)")
            }
            i = j
        }
        let after = memory.allocatedBytes
        state.withLock { s in
            s.stats.discardedBytes += discarded
            s.stats.returnedBytes += before > after ? before - after : 0
            s.stats.discardFailures += failures
        }
    }

    // MARK: statsq

    private func processStatistics(_ queue: inout VirtioQueue, _ memory: GuestMemory,
                                   _ diagnostics: VirtioDiagnostics) throws(VirtqueueError) {
        // New buffers from the driver carry fresh statistics; the device keeps the latest.
        while let chain = try queue.nextChain(from: memory, diagnostics: diagnostics) {
            var values: [UInt16: UInt64] = [:]
            do {
                let bytes = try chain.readableBytes(in: memory)
                if bytes.count % Self.statEntrySize != 0 {
                    fault(diagnostics, "balloonStatsMalformed",
                          "statsq buffer \(chain.head): \(bytes.count) bytes is not a whole number of 10-byte entries; the rest ignored")
                }
                for at in stride(from: 0, to: bytes.count - (Self.statEntrySize - 1), by: Self.statEntrySize) {
                    values[UInt16(Self.le(bytes, at, 2))] = Self.le(bytes, at + 2, 8)
                }
            } catch {
                fault(diagnostics, "guestMemory", error.description)
            }
            let previous = state.withLock { s -> UInt16? in
                defer { s.heldStatsHead = chain.head }
                s.guestStats = VirtioBalloonGuestStatistics(values: values)
                s.stats.statisticsUpdates += 1
                s.changed = true
                return s.heldStatsHead
            }
            if let previous {
                // The driver must keep at most one buffer here (5.5.6.3); give the older back.
                fault(diagnostics, "balloonStatsExtraBuffer", "statsq: driver added buffer \(chain.head) while the device held \(previous)")
                try queue.addUsed(head: previous, length: 0, in: memory)
            }
        }
        // The host wants fresh numbers: hand the held buffer back for the driver to refill.
        let give = state.withLock { s -> UInt16? in
            guard s.statsRequested, let head = s.heldStatsHead else { return nil }
            s.statsRequested = false
            s.heldStatsHead = nil
            return head
        }
        if let give { try queue.addUsed(head: give, length: 0, in: memory) }
    }

    /// The little-endian value of `count` bytes at `at`.
    private static func le(_ bytes: [UInt8], _ at: Int, _ count: Int) -> UInt64 {
        var value: UInt64 = 0
        for k in 0..<count { value |= UInt64(bytes[at + k]) << UInt64(8 * k) }
        return value
    }
}
