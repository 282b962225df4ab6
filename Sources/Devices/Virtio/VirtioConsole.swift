import Synchronization
import VirtCore

/// virtio-console (device ID 3), one port: receiveq 0 carries host input to the guest,
/// transmitq 1 carries guest output to `output`.
///
/// Host input arriving while the driver has no receive buffers posted is kept (up to
/// `maxBufferedInput` bytes, beyond which it is dropped and counted) and delivered when
/// buffers appear — including across a device reset, since it is the host's data, not
/// device state.
///
/// Offers VIRTIO_CONSOLE_F_EMERG_WRITE: a byte written to config offset 8 goes straight
/// to `output`, which lets an early-boot guest print before any queue exists.
public final class VirtioConsole: VirtioDevice {
    public static let receiveQueue = 0
    public static let transmitQueue = 1
    public static let featureEmergencyWrite: UInt64 = 1 << 2

    public let name: String
    public var deviceID: VirtioDeviceID { .console }
    public var offeredFeatures: UInt64 { Self.featureEmergencyWrite }
    public let queueMaxSizes: [UInt16]
    public let maxBufferedInput: Int

    private struct State {
        var input: [UInt8] = []
        var inputHead = 0
        var droppedInput: UInt64 = 0
        var outbox: [[UInt8]] = []
        /// A thread is handing the outbox to `output`.
        var draining = false
        var transmitted: UInt64 = 0
        var delivered: UInt64 = 0
        var transport = WeakTransport()

        var pending: Int { input.count - inputHead }
    }

    private let state = Mutex(State())
    private let output: @Sendable ([UInt8]) -> Void

    /// - Parameters:
    ///   - output: receives the guest's output, in order, on the vCPU thread that sent it.
    ///     It may call `receive` (e.g. an echo), but not this console's transport.
    ///   - queueSize: QueueNumMax of both queues (a power of two).
    public init(name: String = "virtio-console", queueSize: UInt16 = 256, maxBufferedInput: Int = 1 << 20,
                output: @escaping @Sendable ([UInt8]) -> Void) {
        self.name = name
        self.queueMaxSizes = [queueSize, queueSize]
        self.maxBufferedInput = maxBufferedInput
        self.output = output
    }

    /// Queues `bytes` for the guest and delivers what fits into posted receive buffers.
    /// Callable from any thread.
    public func receive<C: Collection>(_ bytes: C) where C.Element == UInt8 {
        let transport = state.withLock { s -> (any VirtioTransportHandle)? in
            if s.inputHead > 4096, s.inputHead * 2 > s.input.count {
                s.input.removeFirst(s.inputHead)
                s.inputHead = 0
            }
            let room = max(0, maxBufferedInput - s.pending)
            s.input.append(contentsOf: bytes.prefix(room))
            s.droppedInput += UInt64(max(0, bytes.count - room))
            return s.transport.value
        }
        transport?.processQueue(Self.receiveQueue)
    }

    /// Host input not yet delivered to the guest.
    public var pendingInputCount: Int { state.withLock { $0.pending } }
    public var droppedInputBytes: UInt64 { state.withLock { $0.droppedInput } }
    public var transmittedBytes: UInt64 { state.withLock { $0.transmitted } }
    public var deliveredBytes: UInt64 { state.withLock { $0.delivered } }

    // MARK: VirtioDevice

    public func configSpace() -> [UInt8] {
        var c = ConfigWriter()
        c.put(UInt16(0))  // cols (VIRTIO_CONSOLE_F_SIZE not offered)
        c.put(UInt16(0))  // rows
        c.put(UInt32(1))  // max_nr_ports (meaningful only with MULTIPORT)
        c.put(UInt32(0))  // emerg_wr reads as 0
        return c.bytes
    }

    public func writeConfig(offset: Int, bytes: [UInt8]) {
        // emerg_wr: the low byte is a character to print.
        guard offset == 8, let byte = bytes.first else { return }
        state.withLock {
            $0.outbox.append([byte])
            $0.transmitted += 1
        }
    }

    public func attach(to transport: any VirtioTransportHandle) {
        state.withLock { $0.transport = WeakTransport(value: transport) }
    }

    public func reset() {}

    public func process(queue index: Int, _ queue: inout VirtioQueue, memory: GuestMemory,
                        diagnostics: VirtioDiagnostics) throws(VirtqueueError) {
        switch index {
        case Self.receiveQueue: try fillReceiveBuffers(&queue, memory, diagnostics)
        case Self.transmitQueue: try drainTransmitBuffers(&queue, memory, diagnostics)
        default: break
        }
    }

    private func fillReceiveBuffers(_ queue: inout VirtioQueue, _ memory: GuestMemory,
                                    _ diagnostics: VirtioDiagnostics) throws(VirtqueueError) {
        // Only take a buffer when there is something to put in it.
        while state.withLock({ $0.pending }) > 0 {
            guard let chain = try queue.nextChain(from: memory, diagnostics: diagnostics) else { return }
            let bytes = state.withLock { s -> [UInt8] in
                let n = min(s.pending, chain.writableLength)
                defer { s.inputHead += n }
                return Array(s.input[s.inputHead ..< s.inputHead + n])
            }
            if bytes.isEmpty {
                diagnostics.record(VirtioDeviceError(
                    kind: "consoleReceiveBufferNotWritable",
                    message: "receiveq chain \(chain.head) has no device-writable buffer"))
            }
            var written = 0
            do { written = try chain.writeWritable(bytes, in: memory) } catch {
                // Unreachable for a validated chain; never crash on it all the same.
                diagnostics.record(VirtioDeviceError(kind: "guestMemory", message: error.description))
            }
            state.withLock { $0.delivered += UInt64(written) }
            try queue.addUsed(head: chain.head, length: UInt32(written), in: memory)
        }
    }

    private func drainTransmitBuffers(_ queue: inout VirtioQueue, _ memory: GuestMemory,
                                      _ diagnostics: VirtioDiagnostics) throws(VirtqueueError) {
        while let chain = try queue.nextChain(from: memory, diagnostics: diagnostics) {
            do {
                let bytes = try chain.readableBytes(in: memory)
                if !bytes.isEmpty {
                    state.withLock {
                        $0.outbox.append(bytes)
                        $0.transmitted += UInt64(bytes.count)
                    }
                }
            } catch {
                diagnostics.record(VirtioDeviceError(kind: "guestMemory", message: error.description))
            }
            // transmitq buffers are device-readable: nothing was written into them.
            try queue.addUsed(head: chain.head, length: 0, in: memory)
        }
    }

    public func performDeferredWork() {
        // One thread at a time drains, until the outbox is empty, so output keeps ring
        // order across vCPUs; no lock is held while `output` runs, so it may re-enter.
        var chunks = state.withLock { s -> [[UInt8]] in
            guard !s.draining, !s.outbox.isEmpty else { return [] }
            s.draining = true
            defer { s.outbox.removeAll() }
            return s.outbox
        }
        while !chunks.isEmpty {
            for chunk in chunks { output(chunk) }
            chunks = state.withLock { s -> [[UInt8]] in
                defer { s.outbox.removeAll() }
                if s.outbox.isEmpty { s.draining = false }
                return s.outbox
            }
        }
    }
}
