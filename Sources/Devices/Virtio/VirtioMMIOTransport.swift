import Synchronization
import VirtCore

/// A driver broke the virtio-mmio register protocol. The offending write is ignored
/// (the register keeps its value, which the driver can see by reading it back).
public enum VirtioDriverError: VirtioFault, Equatable {
    /// Registers below 0x100 take aligned 32-bit accesses only (spec 4.2.2.2).
    case accessSize(offset: UInt64, size: UInt8)
    case unknownRegister(offset: UInt64)
    case writeToReadOnly(offset: UInt64)
    case configAccess(offset: UInt64, size: UInt8, configSize: Int)
    /// A Status write that clears bits, sets undefined or device-owned bits, or skips a
    /// step of ACKNOWLEDGE → DRIVER → FEATURES_OK → DRIVER_OK.
    case invalidStatusTransition(from: UInt8, to: UInt8)
    /// DriverFeatures written outside DRIVER … FEATURES_OK.
    case featuresWrittenOutOfOrder(status: UInt8)
    /// FEATURES_OK with features that were not offered (or beyond bit 63).
    case unofferedFeatures(requested: UInt64, offered: UInt64)
    case missingVersion1(requested: UInt64)
    case featuresRefusedByDevice(requested: UInt64)
    /// A queue register written before FEATURES_OK, after DRIVER_OK, or while the queue
    /// is ready.
    case queueConfigurationNotAllowed(queue: UInt32, status: UInt8, queueReady: Bool)
    case noSuchQueue(UInt32)
    case invalidQueueSize(queue: UInt32, size: UInt64, max: UInt16)
    case invalidQueueLayout(queue: UInt32, VirtqueueError)

    public var kind: String {
        switch self {
        case .accessSize: return "registerAccessSize"
        case .unknownRegister: return "unknownRegister"
        case .writeToReadOnly: return "writeToReadOnly"
        case .configAccess: return "configAccess"
        case .invalidStatusTransition: return "invalidStatusTransition"
        case .featuresWrittenOutOfOrder: return "featuresWrittenOutOfOrder"
        case .unofferedFeatures: return "unofferedFeatures"
        case .missingVersion1: return "missingVersion1"
        case .featuresRefusedByDevice: return "featuresRefusedByDevice"
        case .queueConfigurationNotAllowed: return "queueConfigurationNotAllowed"
        case .noSuchQueue: return "noSuchQueue"
        case .invalidQueueSize: return "invalidQueueSize"
        case .invalidQueueLayout: return "invalidQueueLayout"
        }
    }

    public var description: String {
        func hex<T: BinaryInteger>(_ v: T) -> String { "0x" + String(v, radix: 16) }
        switch self {
        case let .accessSize(offset, size):
            return "\(size)-byte access to register \(hex(offset)) (registers take aligned 32-bit accesses)"
        case let .unknownRegister(offset):
            return "access to unknown register \(hex(offset))"
        case let .writeToReadOnly(offset):
            return "write to read-only register \(hex(offset))"
        case let .configAccess(offset, size, configSize):
            return "\(size)-byte config access at \(hex(offset)) outside the \(configSize)-byte config space"
        case let .invalidStatusTransition(from, to):
            return "status \(hex(from)) → \(hex(to)) is not a valid step (ACKNOWLEDGE → DRIVER → FEATURES_OK → DRIVER_OK, bits never cleared except by writing 0)"
        case let .featuresWrittenOutOfOrder(status):
            return "driver features written with status \(hex(status)) (allowed after DRIVER, before FEATURES_OK)"
        case let .unofferedFeatures(requested, offered):
            return "driver asked for features \(hex(requested)), device offers \(hex(offered)); FEATURES_OK refused"
        case let .missingVersion1(requested):
            return "driver features \(hex(requested)) lack VIRTIO_F_VERSION_1 (bit 32); FEATURES_OK refused (no legacy mode)"
        case let .featuresRefusedByDevice(requested):
            return "device cannot work with features \(hex(requested)); FEATURES_OK refused"
        case let .queueConfigurationNotAllowed(queue, status, ready):
            return "queue \(queue) configured with status \(hex(status))\(ready ? " while ready" : "") (allowed after FEATURES_OK, before DRIVER_OK, while not ready)"
        case let .noSuchQueue(queue):
            return "queue \(queue) does not exist"
        case let .invalidQueueSize(queue, size, max):
            return "queue \(queue): size \(size) is not a power of two in 1...\(max)"
        case let .invalidQueueLayout(queue, error):
            return "queue \(queue) not made ready: \(error.description)"
        }
    }
}

/// The virtio-mmio transport, register layout version 2 (virtio 1.x spec 4.2.2), in front
/// of one `VirtioDevice`.
///
/// Register behaviour chosen where the spec leaves room:
/// - Registers (offsets below 0x100) accept only aligned 32-bit accesses; anything else
///   reads 0 and is ignored on write, and is counted as a driver fault.
/// - Write-only registers read as 0; writes to read-only registers are ignored (counted).
/// - Protocol violations (bad Status step, features or queue setup at the wrong time, a
///   bad QueueNum or ring layout) are ignored and counted; the register keeps its value.
/// - FEATURES_OK with unacceptable features leaves FEATURES_OK clear (spec 3.1.1).
/// - Queue-processing faults the device cannot confine to one request set
///   DEVICE_NEEDS_RESET and raise a configuration-change interrupt; the device then
///   ignores notifications until the driver writes 0 to Status.
/// - QueueNotify processes the queue synchronously on the writing thread. Notifications
///   before DRIVER_OK are ignored; setting DRIVER_OK processes every ready queue once, so
///   buffers posted earlier are not lost.
/// - The interrupt line is driven under the transport lock so assert/deassert calls
///   cannot be reordered between threads; the `InterruptLine` must not call back into
///   this transport.
public final class VirtioMMIOTransport: MMIODevice, VirtioTransportHandle, Sendable {
    public static let magicValue: UInt32 = 0x7472_6976  // "virt"
    public static let version: UInt32 = 2
    /// "SVMV", Swiftvisor's virtio vendor ID.
    public static let vendorID: UInt32 = 0x5356_4D56
    /// Bytes of MMIO space one transport decodes: registers plus up to 0x100 of config.
    public static let regionSize: UInt64 = 0x200
    public static let configOffset: UInt64 = 0x100
    /// QueueNotify: a VMM may route writes here to an ioeventfd and call `processQueue`.
    public static let queueNotifyOffset: UInt64 = Register.queueNotify

    /// Register offsets (spec 4.2.2, table "MMIO Device Register Layout").
    enum Register {
        static let magicValue: UInt64 = 0x000
        static let version: UInt64 = 0x004
        static let deviceID: UInt64 = 0x008
        static let vendorID: UInt64 = 0x00C
        static let deviceFeatures: UInt64 = 0x010
        static let deviceFeaturesSel: UInt64 = 0x014
        static let driverFeatures: UInt64 = 0x020
        static let driverFeaturesSel: UInt64 = 0x024
        static let queueSel: UInt64 = 0x030
        static let queueNumMax: UInt64 = 0x034
        static let queueNum: UInt64 = 0x038
        static let queueReady: UInt64 = 0x044
        static let queueNotify: UInt64 = 0x050
        static let interruptStatus: UInt64 = 0x060
        static let interruptACK: UInt64 = 0x064
        static let status: UInt64 = 0x070
        static let queueDescLow: UInt64 = 0x080
        static let queueDescHigh: UInt64 = 0x084
        static let queueDriverLow: UInt64 = 0x090
        static let queueDriverHigh: UInt64 = 0x094
        static let queueDeviceLow: UInt64 = 0x0A0
        static let queueDeviceHigh: UInt64 = 0x0A4
        static let shmSel: UInt64 = 0x0AC
        static let shmLenLow: UInt64 = 0x0B0
        static let shmLenHigh: UInt64 = 0x0B4
        static let shmBaseLow: UInt64 = 0x0B8
        static let shmBaseHigh: UInt64 = 0x0BC
        static let queueReset: UInt64 = 0x0C0
        static let configGeneration: UInt64 = 0x0FC
    }

    /// The shared virtio state and the interrupt line's level.
    private struct State {
        var function: VirtioFunction
        var lineAsserted = false
    }

    public let name: String
    public let device: any VirtioDevice
    public let memory: GuestMemory
    public let diagnostics: VirtioDiagnostics
    /// Device features as the driver reads them: the device's plus VERSION_1.
    public let offeredFeatures: UInt64
    private let interrupt: InterruptLine?
    private let state: Mutex<State>

    /// - Parameters:
    ///   - interrupt: the device's interrupt line (nil: polled, e.g. in tests).
    ///   - log: where first-of-their-kind faults are reported (default: stderr).
    public init(device: any VirtioDevice, memory: GuestMemory, interrupt: InterruptLine? = nil,
                name: String? = nil, log: @escaping VirtioDiagnostics.LogSink = VirtioDiagnostics.standardError) {
        let name = name ?? device.name
        self.name = name
        self.device = device
        self.memory = memory
        self.interrupt = interrupt
        let diagnostics = VirtioDiagnostics(deviceName: name, log: log)
        self.diagnostics = diagnostics
        let function = VirtioFunction(device: device, memory: memory, diagnostics: diagnostics)
        self.offeredFeatures = function.offeredFeatures
        self.state = Mutex(State(function: function))
        device.attach(to: self)
    }

    // MARK: Host-side view (VMM, tests)

    public var status: UInt8 { state.withLock { $0.function.status } }
    public var interruptStatus: UInt32 { state.withLock { $0.function.interruptStatus } }
    public var negotiatedFeatures: UInt64 { state.withLock { $0.function.negotiated } }
    public var configGeneration: UInt32 { state.withLock { $0.function.configGeneration } }
    public var needsReset: Bool { state.withLock { $0.function.status & VirtioStatus.deviceNeedsReset != 0 } }
    /// A copy of queue `index`'s state, or nil if there is no such queue.
    public func queue(_ index: Int) -> VirtioQueue? {
        state.withLock { s in s.function.queues.indices.contains(index) ? s.function.queues[index] : nil }
    }

    /// Routes the device's DMA through the IOMMU as `dma`'s function (nil: straight to RAM).
    public func routeDMA(through dma: DeviceDMA?) {
        state.withLock { s in for i in s.function.queues.indices { s.function.queues[i].dma = dma } }
    }

    // MARK: VirtioTransportHandle

    public func processQueue(_ index: Int) {
        state.withLock { s in
            s.function.hostRequestsProcessing(index)
            updateLine(&s)
        }
        device.performDeferredWork()
    }

    // MARK: Snapshots

    /// Stops the device touching guest memory (host-initiated processing is deferred) so a
    /// snapshot sees memory and device state at one point. The vCPUs must be paused.
    public func freeze() { state.withLock { $0.function.frozen = true } }

    /// Ends `freeze()` and processes what was deferred.
    public func thaw() {
        for q in state.withLock({ $0.function.thaw() }) { processQueue(q) }
    }

    /// The transport's register and queue state, for a snapshot.
    public typealias SavedState = VirtioFunctionState

    public var savedState: SavedState { state.withLock { $0.function.savedState } }

    /// Restores a saved state into a freshly made transport for the same device: the
    /// driver finds the device as it left it (a DRIVER_OK device is activated again).
    public func restore(_ saved: SavedState) throws {
        try state.withLock { s throws in
            try s.function.restore(saved, name: name)
            updateLine(&s)
        }
    }

    public func configurationChanged() {
        state.withLock { s in
            s.function.configurationChanged()
            updateLine(&s)
        }
    }

    // MARK: MMIODevice

    public func mmioRead(offset: UInt64, size: UInt8) -> UInt64 {
        if offset >= Self.configOffset {
            return state.withLock { $0.function.readConfig(offset: offset - Self.configOffset, size: size) }
        }
        guard size == 4, offset % 4 == 0 else {
            diagnostics.record(VirtioDriverError.accessSize(offset: offset, size: size))
            return 0
        }
        return UInt64(state.withLock { s -> UInt32 in
            let sel = s.function.selectedQueue
            switch offset {
            case Register.magicValue: return Self.magicValue
            case Register.version: return Self.version
            case Register.deviceID: return device.deviceID.rawValue
            case Register.vendorID: return Self.vendorID
            case Register.deviceFeatures: return s.function.deviceFeatureWord
            case Register.queueNumMax: return sel.map { UInt32(s.function.queues[$0].maxSize) } ?? 0
            case Register.queueReady: return sel.map { s.function.queues[$0].isReady ? 1 : 0 } ?? 0
            case Register.interruptStatus: return s.function.interruptStatus
            case Register.status: return UInt32(s.function.status)
            case Register.configGeneration: return s.function.configGeneration
            // No shared-memory regions: their length and base read as all ones (4.2.2).
            case Register.shmLenLow, Register.shmLenHigh, Register.shmBaseLow, Register.shmBaseHigh:
                return 0xFFFF_FFFF
            case Register.deviceFeaturesSel, Register.driverFeatures, Register.driverFeaturesSel,
                 Register.queueSel, Register.queueNum, Register.queueNotify, Register.interruptACK,
                 Register.queueDescLow, Register.queueDescHigh, Register.queueDriverLow,
                 Register.queueDriverHigh, Register.queueDeviceLow, Register.queueDeviceHigh,
                 Register.shmSel, Register.queueReset:
                return 0  // write-only (or, for QueueReset, not offered)
            default:
                diagnostics.record(VirtioDriverError.unknownRegister(offset: offset))
                return 0
            }
        })
    }

    public func mmioWrite(offset: UInt64, size: UInt8, value: UInt64) {
        if offset >= Self.configOffset {
            state.withLock { $0.function.writeConfig(offset: offset - Self.configOffset, size: size, value: value) }
            device.performDeferredWork()
            return
        }
        guard size == 4, offset % 4 == 0 else {
            diagnostics.record(VirtioDriverError.accessSize(offset: offset, size: size))
            return
        }
        let v = UInt32(truncatingIfNeeded: value)
        state.withLock { s in
            switch offset {
            case Register.deviceFeaturesSel: s.function.deviceFeaturesSel = v
            case Register.driverFeaturesSel: s.function.driverFeaturesSel = v
            case Register.driverFeatures: s.function.writeDriverFeatures(v)
            case Register.queueSel: s.function.queueSel = v
            case Register.queueNum: s.function.setQueueSize(v)
            case Register.queueDescLow: s.function.setRing(.descriptorTable) { VirtioFunction.low(v, $0) }
            case Register.queueDescHigh: s.function.setRing(.descriptorTable) { VirtioFunction.high(v, $0) }
            case Register.queueDriverLow: s.function.setRing(.availableRing) { VirtioFunction.low(v, $0) }
            case Register.queueDriverHigh: s.function.setRing(.availableRing) { VirtioFunction.high(v, $0) }
            case Register.queueDeviceLow: s.function.setRing(.usedRing) { VirtioFunction.low(v, $0) }
            case Register.queueDeviceHigh: s.function.setRing(.usedRing) { VirtioFunction.high(v, $0) }
            case Register.queueReady: s.function.writeQueueReady(v)
            // Without VIRTIO_F_NOTIFICATION_DATA the value is just the queue index.
            case Register.queueNotify: s.function.notify(v)
            case Register.interruptACK: s.function.interruptStatus &= ~v
            case Register.status: s.function.writeStatus(UInt8(truncatingIfNeeded: v))
            case Register.shmSel: break  // no regions; reads of length/base say so
            case Register.magicValue, Register.version, Register.deviceID, Register.vendorID,
                 Register.deviceFeatures, Register.queueNumMax, Register.interruptStatus,
                 Register.configGeneration, Register.shmLenLow, Register.shmLenHigh,
                 Register.shmBaseLow, Register.shmBaseHigh:
                diagnostics.record(VirtioDriverError.writeToReadOnly(offset: offset))
            default:
                // Includes QueueReset: VIRTIO_F_RING_RESET is not offered.
                diagnostics.record(VirtioDriverError.unknownRegister(offset: offset))
            }
            updateLine(&s)
        }
        if offset == Register.queueNotify || offset == Register.status { device.performDeferredWork() }
    }

    /// Drives the line from InterruptStatus (under the lock, so levels cannot be reordered).
    private func updateLine(_ s: inout State) {
        _ = s.function.takeRaised()  // one line for every cause: InterruptStatus says which
        let asserted = s.function.interruptStatus != 0
        guard asserted != s.lineAsserted else { return }
        s.lineAsserted = asserted
        interrupt?(asserted)
    }
}
