import Synchronization
import VirtCore

/// An Ethernet MAC address.
public struct MACAddress: Hashable, Sendable, CustomStringConvertible {
    /// The six bytes in transmission order.
    public let bytes: [UInt8]

    /// nil unless `bytes` has exactly six elements.
    public init?(_ bytes: [UInt8]) {
        guard bytes.count == 6 else { return nil }
        self.bytes = bytes
    }

    /// Parses "52:54:00:12:34:56" (or with dashes).
    public init?(_ text: String) {
        let parts = text.split(whereSeparator: { $0 == ":" || $0 == "-" })
        guard parts.count == 6 else { return nil }
        var bytes: [UInt8] = []
        for p in parts {
            guard p.count == 2, let b = UInt8(p, radix: 16) else { return nil }
            bytes.append(b)
        }
        self.bytes = bytes
    }

    /// From a frame's destination (offset 0) or source (offset 6) field.
    init(frame: [UInt8], at offset: Int) {
        bytes = Array(frame[offset ..< offset + 6])
    }

    public static let broadcast = MACAddress([0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF])!

    /// A random unicast, locally administered address (what a VMM should give a NIC that
    /// has none configured).
    public static func random<G: RandomNumberGenerator>(using generator: inout G) -> MACAddress {
        var b = (0..<6).map { _ in UInt8.random(in: 0...255, using: &generator) }
        b[0] = (b[0] & 0xFC) | 0x02
        return MACAddress(b)!
    }

    public static func random() -> MACAddress {
        var g = SystemRandomNumberGenerator()
        return random(using: &g)
    }

    /// Group addresses (broadcast included) have the I/G bit set.
    public var isMulticast: Bool { bytes[0] & 1 != 0 }

    public var description: String {
        bytes.map { ($0 < 16 ? "0" : "") + String($0, radix: 16) }.joined(separator: ":")
    }
}

/// Takes frames a network backend received for a device.
public protocol NetworkFrameReceiver: AnyObject, Sendable {
    /// One Ethernet frame (destination MAC first; no virtio header). Called from any
    /// thread; must not block.
    func receiveFrame(_ frame: [UInt8])
}

/// Where a virtio-net device's frames go and come from.
public protocol NetworkBackend: AnyObject, Sendable {
    /// Sends one Ethernet frame from the guest. Called from vCPU threads without device
    /// locks held; must not block for long (drop rather than wait).
    func send(_ frame: [UInt8])
    /// Frames received from now on go to `receiver`, which is held weakly; nil detaches.
    func setReceiver(_ receiver: (any NetworkFrameReceiver)?)
}

struct WeakReceiver {
    weak var value: (any NetworkFrameReceiver)?
}

/// Counters a VMM can show for a network device.
public struct VirtioNetStatistics: Equatable, Sendable {
    public var transmittedFrames: UInt64 = 0
    public var transmittedBytes: UInt64 = 0
    /// Guest frames refused: shorter than an Ethernet header or longer than the limit.
    public var transmitDropped: UInt64 = 0
    public var receivedFrames: UInt64 = 0
    public var receivedBytes: UInt64 = 0
    /// Frames for the guest dropped because receive buffers ran out (the pending queue
    /// was full), or because they were not Ethernet frames of a valid size.
    public var receiveDropped: UInt64 = 0
    /// Frames for the guest dropped because the driver had not set DRIVER_OK.
    public var receiveDroppedNotReady: UInt64 = 0
}

/// virtio-net (device ID 1): receiveq 0, transmitq 1, no control queue, no offloads.
///
/// Offers VIRTIO_NET_F_MAC (the MAC is in config) and VIRTIO_NET_F_STATUS (link always
/// up). With VIRTIO_F_VERSION_1 every frame is preceded by the 12-byte
/// virtio_net_hdr_v1; as no checksum or segmentation offload is offered, the device
/// ignores the header on transmit and writes an all-zero one (num_buffers = 1) on receive.
///
/// Frames arriving from the backend wait in a bounded queue (`maxPendingFrames`) until the
/// driver posts receive buffers; beyond that they are dropped and counted.
public final class VirtioNet: VirtioDevice, NetworkFrameReceiver {
    public static let receiveQueue = 0
    public static let transmitQueue = 1
    public static let featureMAC: UInt64 = 1 << 5
    public static let featureStatus: UInt64 = 1 << 16
    /// sizeof(struct virtio_net_hdr_v1).
    public static let headerSize = 12
    /// Destination, source, EtherType.
    public static let minimumFrameSize = 14
    /// No GSO: a frame is at most the largest IPv4/IPv6 packet plus an Ethernet header.
    public static let maximumFrameSize = 65535 + 14

    public let name: String
    public var deviceID: VirtioDeviceID { .network }
    public var offeredFeatures: UInt64 { Self.featureMAC | Self.featureStatus }
    public let queueMaxSizes: [UInt16]
    public let mac: MACAddress
    public let backend: any NetworkBackend
    public let maxPendingFrames: Int

    private struct State {
        var active = false
        var pending: [[UInt8]] = []
        var pendingHead = 0
        var outbox: [[UInt8]] = []
        var draining = false
        var stats = VirtioNetStatistics()
        var transport = WeakTransport()

        var pendingCount: Int { pending.count - pendingHead }
    }

    private let state = Mutex(State())

    public init(mac: MACAddress, backend: any NetworkBackend, queueSize: UInt16 = 256,
                maxPendingFrames: Int = 256, name: String = "virtio-net") {
        self.name = name
        self.mac = mac
        self.backend = backend
        self.queueMaxSizes = [queueSize, queueSize]
        self.maxPendingFrames = maxPendingFrames
        backend.setReceiver(self)
    }

    deinit { backend.setReceiver(nil) }

    public var statistics: VirtioNetStatistics { state.withLock { $0.stats } }
    /// Received frames waiting for receive buffers.
    public var pendingFrames: Int { state.withLock { $0.pendingCount } }

    // MARK: NetworkFrameReceiver

    public func receiveFrame(_ frame: [UInt8]) {
        let transport = state.withLock { s -> (any VirtioTransportHandle)? in
            guard frame.count >= Self.minimumFrameSize, frame.count <= Self.maximumFrameSize else {
                s.stats.receiveDropped += 1
                return nil
            }
            guard s.active else {
                s.stats.receiveDroppedNotReady += 1
                return nil
            }
            guard s.pendingCount < maxPendingFrames else {
                s.stats.receiveDropped += 1
                return nil
            }
            if s.pendingHead > 64, s.pendingHead * 2 > s.pending.count {
                s.pending.removeFirst(s.pendingHead)
                s.pendingHead = 0
            }
            s.pending.append(frame)
            return s.transport.value
        }
        transport?.processQueue(Self.receiveQueue)
    }

    // MARK: VirtioDevice

    public func configSpace() -> [UInt8] {
        var c = ConfigWriter()
        c.put(mac.bytes)
        c.put(UInt16(1))  // status: VIRTIO_NET_S_LINK_UP
        c.put(UInt16(1))  // max_virtqueue_pairs (MQ not offered)
        return c.bytes
    }

    public func attach(to transport: any VirtioTransportHandle) {
        state.withLock { $0.transport = WeakTransport(value: transport) }
    }

    public func activate(features: UInt64) throws(VirtioDeviceError) {
        state.withLock { $0.active = true }
    }

    public func reset() {
        // Frames queued for the old driver instance mean nothing to the next one.
        state.withLock { s in
            s.active = false
            s.pending.removeAll()
            s.pendingHead = 0
        }
    }

    public func process(queue index: Int, _ queue: inout VirtioQueue, memory: GuestMemory,
                        diagnostics: VirtioDiagnostics) throws(VirtqueueError) {
        switch index {
        case Self.receiveQueue: try deliverPending(&queue, memory, diagnostics)
        case Self.transmitQueue: try collectTransmitted(&queue, memory, diagnostics)
        default: break
        }
    }

    private func deliverPending(_ queue: inout VirtioQueue, _ memory: GuestMemory,
                                _ diagnostics: VirtioDiagnostics) throws(VirtqueueError) {
        // virtio_net_hdr_v1 with nothing offloaded; num_buffers (offset 10) must be 1.
        let header: [UInt8] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]
        while let next = state.withLock({ $0.pendingCount > 0 ? $0.pending[$0.pendingHead] : nil }) {
            guard let chain = try queue.nextChain(from: memory, diagnostics: diagnostics) else { return }
            let needed = Self.headerSize + next.count
            guard chain.writableLength >= needed else {
                // Without VIRTIO_NET_F_MRG_RXBUF a frame must fit one chain. Hand this
                // buffer back empty rather than deliver a truncated frame; the frame
                // waits for the next buffer.
                diagnostics.record(VirtioDeviceError(
                    kind: "netReceiveBufferTooSmall",
                    message: "receive chain \(chain.head) holds \(chain.writableLength) bytes, frame needs \(needed)"))
                try queue.addUsed(head: chain.head, length: 0, in: memory)
                continue
            }
            // Frames are only taken here and dropped in `reset`, both under the transport
            // lock (receiveFrame merely appends and compacts), so the frame peeked above
            // is still the first one.
            let frame = state.withLock { s -> [UInt8] in
                defer { s.pending[s.pendingHead] = []; s.pendingHead += 1 }
                return s.pending[s.pendingHead]
            }
            var used: UInt32 = 0
            do {
                try chain.writeWritable(header, in: memory)
                try chain.writeWritable(frame, at: Self.headerSize, in: memory)
                used = UInt32(needed)
                state.withLock { $0.stats.receivedFrames += 1; $0.stats.receivedBytes += UInt64(frame.count) }
            } catch {
                diagnostics.record(VirtioDeviceError(kind: "guestMemory", message: error.description))
            }
            try queue.addUsed(head: chain.head, length: used, in: memory)
        }
    }

    private func collectTransmitted(_ queue: inout VirtioQueue, _ memory: GuestMemory,
                                    _ diagnostics: VirtioDiagnostics) throws(VirtqueueError) {
        while let chain = try queue.nextChain(from: memory, diagnostics: diagnostics) {
            let length = chain.readableLength - Self.headerSize
            if length < Self.minimumFrameSize || length > Self.maximumFrameSize {
                diagnostics.record(VirtioDeviceError(
                    kind: "netBadTransmitLength",
                    message: "transmit chain \(chain.head) has \(chain.readableLength) bytes (header \(Self.headerSize) + frame \(Self.minimumFrameSize)...\(Self.maximumFrameSize))"))
                state.withLock { $0.stats.transmitDropped += 1 }
            } else {
                do {
                    let frame = try chain.readableBytes(in: memory, offset: Self.headerSize)
                    state.withLock { s in
                        s.outbox.append(frame)
                        s.stats.transmittedFrames += 1
                        s.stats.transmittedBytes += UInt64(frame.count)
                    }
                } catch {
                    diagnostics.record(VirtioDeviceError(kind: "guestMemory", message: error.description))
                }
            }
            try queue.addUsed(head: chain.head, length: 0, in: memory)
        }
    }

    public func performDeferredWork() {
        // As in VirtioConsole: one drainer at a time keeps frame order; no lock is held
        // while the backend runs, so a backend that loops frames back cannot deadlock.
        var frames = state.withLock { s -> [[UInt8]] in
            guard !s.draining, !s.outbox.isEmpty else { return [] }
            s.draining = true
            defer { s.outbox.removeAll() }
            return s.outbox
        }
        while !frames.isEmpty {
            for frame in frames { backend.send(frame) }
            frames = state.withLock { s -> [[UInt8]] in
                defer { s.outbox.removeAll() }
                if s.outbox.isEmpty { s.draining = false }
                return s.outbox
            }
        }
    }
}
