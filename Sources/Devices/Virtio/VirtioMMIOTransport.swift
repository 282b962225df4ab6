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

    private struct State {
        var status: UInt8 = 0
        var deviceFeaturesSel: UInt32 = 0
        var driverFeaturesSel: UInt32 = 0
        var driverFeatures: UInt64 = 0
        /// The driver set a bit in a feature word beyond bit 63: never acceptable.
        var driverFeaturesBeyond64 = false
        var negotiated: UInt64 = 0
        var queueSel: UInt32 = 0
        var queues: [VirtioQueue]
        var interruptStatus: UInt32 = 0
        var lineAsserted = false
        /// Frozen for a snapshot: queue processing is deferred (the queues to process later).
        var frozen = false
        var deferredQueues: Set<Int> = []
        var configGeneration: UInt32 = 0

        /// The device may consume buffers: DRIVER_OK set, no error state.
        var isLive: Bool {
            status & VirtioStatus.driverOK != 0
                && status & (VirtioStatus.deviceNeedsReset | VirtioStatus.failed) == 0
        }
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
        self.diagnostics = VirtioDiagnostics(deviceName: name, log: log)
        // Never offer what this implementation lacks, whatever a device claims.
        let unsupported = VirtioFeature.indirectDescriptors | VirtioFeature.eventIndex
            | VirtioFeature.accessPlatform | VirtioFeature.ringPacked
        self.offeredFeatures = (device.offeredFeatures & ~unsupported) | VirtioFeature.version1
        let queues = device.queueMaxSizes.enumerated().map { VirtioQueue(index: $0.offset, maxSize: $0.element) }
        self.state = Mutex(State(queues: queues))
        device.attach(to: self)
    }

    // MARK: Host-side view (VMM, tests)

    public var status: UInt8 { state.withLock { $0.status } }
    public var interruptStatus: UInt32 { state.withLock { $0.interruptStatus } }
    public var negotiatedFeatures: UInt64 { state.withLock { $0.negotiated } }
    public var configGeneration: UInt32 { state.withLock { $0.configGeneration } }
    public var needsReset: Bool { state.withLock { $0.status & VirtioStatus.deviceNeedsReset != 0 } }
    /// A copy of queue `index`'s state, or nil if there is no such queue.
    public func queue(_ index: Int) -> VirtioQueue? {
        state.withLock { s in s.queues.indices.contains(index) ? s.queues[index] : nil }
    }

    /// Routes the device's DMA through the IOMMU as `dma`'s function (nil: straight to RAM).
    public func routeDMA(through dma: DeviceDMA?) {
        state.withLock { s in for i in s.queues.indices { s.queues[i].dma = dma } }
    }

    // MARK: VirtioTransportHandle

    public func processQueue(_ index: Int) {
        state.withLock { s in
            guard s.queues.indices.contains(index) else { return }
            if s.frozen { s.deferredQueues.insert(index); return }
            process(index, &s)
        }
        device.performDeferredWork()
    }

    // MARK: Snapshots

    /// Stops the device touching guest memory (host-initiated processing is deferred) so a
    /// snapshot sees memory and device state at one point. The vCPUs must be paused.
    public func freeze() { state.withLock { $0.frozen = true } }

    /// Ends `freeze()` and processes what was deferred.
    public func thaw() {
        let deferred = state.withLock { s -> Set<Int> in
            s.frozen = false
            defer { s.deferredQueues = [] }
            return s.deferredQueues
        }
        for q in deferred.sorted() { processQueue(q) }
    }

    /// The transport's register and queue state, for a snapshot.
    public struct SavedState: Codable, Sendable, Equatable {
        public var status: UInt8
        public var deviceFeaturesSel: UInt32, driverFeaturesSel: UInt32
        public var driverFeatures: UInt64, negotiated: UInt64
        public var queueSel: UInt32
        public var queues: [VirtioQueue.SavedState]
        public var interruptStatus: UInt32
        public var configGeneration: UInt32
    }

    public var savedState: SavedState {
        state.withLock { s in
            SavedState(status: s.status, deviceFeaturesSel: s.deviceFeaturesSel, driverFeaturesSel: s.driverFeaturesSel,
                       driverFeatures: s.driverFeatures, negotiated: s.negotiated, queueSel: s.queueSel,
                       queues: s.queues.map(\.savedState), interruptStatus: s.interruptStatus,
                       configGeneration: s.configGeneration)
        }
    }

    /// Restores a saved state into a freshly made transport for the same device: the
    /// driver finds the device as it left it (a DRIVER_OK device is activated again).
    public func restore(_ saved: SavedState) throws {
        try state.withLock { s throws in
            guard saved.queues.count == s.queues.count else {
                throw VirtioDeviceError(kind: "restoreMismatch", message: "\(name): saved state has \(saved.queues.count) queues, the device \(s.queues.count)")
            }
            for (i, q) in saved.queues.enumerated() {
                do throws(VirtqueueError) { try s.queues[i].restore(q, in: memory) } catch {
                    throw VirtioDeviceError(kind: "restoreQueue", message: "\(name): saved queue \(i) is invalid: \(error)")
                }
            }
            s.status = saved.status
            s.deviceFeaturesSel = saved.deviceFeaturesSel
            s.driverFeaturesSel = saved.driverFeaturesSel
            s.driverFeatures = saved.driverFeatures
            s.negotiated = saved.negotiated
            s.queueSel = saved.queueSel
            s.configGeneration = saved.configGeneration
            if s.status & VirtioStatus.driverOK != 0 {
                do throws(VirtioDeviceError) { try device.activate(features: s.negotiated) } catch { enterNeedsReset(&s) }
            }
            s.interruptStatus = saved.interruptStatus
            updateLine(&s)
        }
    }

    public func configurationChanged() {
        state.withLock { s in
            s.configGeneration &+= 1
            // Notifications are only sent to a driver that has finished initialisation.
            if s.status & VirtioStatus.driverOK != 0 { raise(VirtioInterrupt.configurationChange, &s) }
        }
    }

    // MARK: MMIODevice

    public func mmioRead(offset: UInt64, size: UInt8) -> UInt64 {
        if offset >= Self.configOffset { return readConfig(offset: offset - Self.configOffset, size: size) }
        guard size == 4, offset % 4 == 0 else {
            diagnostics.record(VirtioDriverError.accessSize(offset: offset, size: size))
            return 0
        }
        return UInt64(state.withLock { s -> UInt32 in
            let sel = Int(s.queueSel)
            let hasQueue = s.queues.indices.contains(sel)
            switch offset {
            case Register.magicValue: return Self.magicValue
            case Register.version: return Self.version
            case Register.deviceID: return device.deviceID.rawValue
            case Register.vendorID: return Self.vendorID
            case Register.deviceFeatures:
                switch s.deviceFeaturesSel {
                case 0: return UInt32(truncatingIfNeeded: offeredFeatures)
                case 1: return UInt32(truncatingIfNeeded: offeredFeatures >> 32)
                default: return 0
                }
            case Register.queueNumMax: return hasQueue ? UInt32(s.queues[sel].maxSize) : 0
            case Register.queueReady: return hasQueue && s.queues[sel].isReady ? 1 : 0
            case Register.interruptStatus: return s.interruptStatus
            case Register.status: return UInt32(s.status)
            case Register.configGeneration: return s.configGeneration
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
            writeConfig(offset: offset - Self.configOffset, size: size, value: value)
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
            case Register.deviceFeaturesSel: s.deviceFeaturesSel = v
            case Register.driverFeaturesSel: s.driverFeaturesSel = v
            case Register.driverFeatures: writeDriverFeatures(v, &s)
            case Register.queueSel: s.queueSel = v
            case Register.queueNum:
                let sel = s.queueSel
                configureQueue(&s) { q throws(VirtioDriverError) in
                    guard v > 0, v <= UInt32(q.maxSize), v & (v - 1) == 0 else {
                        throw .invalidQueueSize(queue: sel, size: UInt64(v), max: q.maxSize)
                    }
                    try Self.queueChange(q.index) { () throws(VirtqueueError) in try q.trySetSize(UInt16(v)) }
                }
            case Register.queueDescLow: setRing(.descriptorTable, &s) { Self.low(v, $0) }
            case Register.queueDescHigh: setRing(.descriptorTable, &s) { Self.high(v, $0) }
            case Register.queueDriverLow: setRing(.availableRing, &s) { Self.low(v, $0) }
            case Register.queueDriverHigh: setRing(.availableRing, &s) { Self.high(v, $0) }
            case Register.queueDeviceLow: setRing(.usedRing, &s) { Self.low(v, $0) }
            case Register.queueDeviceHigh: setRing(.usedRing, &s) { Self.high(v, $0) }
            case Register.queueReady: writeQueueReady(v, &s)
            case Register.queueNotify:
                // Without VIRTIO_F_NOTIFICATION_DATA the value is just the queue index.
                guard s.queues.indices.contains(Int(v)) else {
                    diagnostics.record(VirtioDriverError.noSuchQueue(v))
                    return
                }
                process(Int(v), &s)
            case Register.interruptACK:
                s.interruptStatus &= ~v
                updateLine(&s)
            case Register.status: writeStatus(UInt8(truncatingIfNeeded: v), &s)
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
        }
        if offset == Register.queueNotify || offset == Register.status { device.performDeferredWork() }
    }

    private static func low(_ v: UInt32, _ old: UInt64) -> UInt64 { (old & 0xFFFF_FFFF_0000_0000) | UInt64(v) }
    private static func high(_ v: UInt32, _ old: UInt64) -> UInt64 { (old & 0xFFFF_FFFF) | (UInt64(v) << 32) }

    // MARK: Configuration space

    private func readConfig(offset: UInt64, size: UInt8) -> UInt64 {
        let bytes = state.withLock { _ in device.configSpace() }
        guard [1, 2, 4, 8].contains(size), offset < UInt64(bytes.count),
              UInt64(size) <= UInt64(bytes.count) - offset else {
            diagnostics.record(VirtioDriverError.configAccess(offset: offset, size: size, configSize: bytes.count))
            return 0
        }
        var value: UInt64 = 0
        for i in 0..<Int(size) { value |= UInt64(bytes[Int(offset) + i]) << (8 * UInt64(i)) }
        return value
    }

    private func writeConfig(offset: UInt64, size: UInt8, value: UInt64) {
        state.withLock { _ in
            let count = device.configSpace().count
            guard [1, 2, 4, 8].contains(size), offset < UInt64(count), UInt64(size) <= UInt64(count) - offset else {
                diagnostics.record(VirtioDriverError.configAccess(offset: offset, size: size, configSize: count))
                return
            }
            let bytes = (0..<Int(size)).map { UInt8(truncatingIfNeeded: value >> (8 * UInt64($0))) }
            device.writeConfig(offset: Int(offset), bytes: bytes)
        }
    }

    // MARK: Feature negotiation and status

    private func writeDriverFeatures(_ v: UInt32, _ s: inout State) {
        guard s.status & VirtioStatus.driver != 0, s.status & VirtioStatus.featuresOK == 0 else {
            diagnostics.record(VirtioDriverError.featuresWrittenOutOfOrder(status: s.status))
            return
        }
        switch s.driverFeaturesSel {
        case 0: s.driverFeatures = (s.driverFeatures & 0xFFFF_FFFF_0000_0000) | UInt64(v)
        case 1: s.driverFeatures = (s.driverFeatures & 0xFFFF_FFFF) | (UInt64(v) << 32)
        default: if v != 0 { s.driverFeaturesBeyond64 = true }
        }
    }

    private func featureProblem(_ s: State) -> VirtioDriverError? {
        let requested = s.driverFeatures
        if requested & ~offeredFeatures != 0 || s.driverFeaturesBeyond64 {
            return .unofferedFeatures(requested: requested, offered: offeredFeatures)
        }
        if requested & VirtioFeature.version1 == 0 { return .missingVersion1(requested: requested) }
        if !device.accepts(features: requested) { return .featuresRefusedByDevice(requested: requested) }
        return nil
    }

    private func writeStatus(_ value: UInt8, _ s: inout State) {
        if value == 0 {
            reset(&s)
            return
        }
        let deviceBits = s.status & VirtioStatus.deviceNeedsReset
        let old = s.status & ~VirtioStatus.deviceNeedsReset
        // DEVICE_NEEDS_RESET belongs to the device; a driver echoing it back is harmless.
        var new = value & ~VirtioStatus.deviceNeedsReset
        let stepsInOrder = (new & VirtioStatus.driver == 0 || new & VirtioStatus.acknowledge != 0)
            && (new & VirtioStatus.featuresOK == 0 || new & VirtioStatus.driver != 0)
            && (new & VirtioStatus.driverOK == 0 || new & VirtioStatus.featuresOK != 0)
        guard new & ~VirtioStatus.driverWritable == 0, new & old == old, stepsInOrder else {
            diagnostics.record(VirtioDriverError.invalidStatusTransition(from: s.status, to: value))
            return
        }
        let added = new & ~old
        if added & VirtioStatus.featuresOK != 0 {
            if let problem = featureProblem(s) {
                // Spec 3.1.1: the device leaves FEATURES_OK clear; the driver re-reads
                // Status, sees that, and gives up. DRIVER_OK cannot stand without it.
                diagnostics.record(problem)
                new &= ~(VirtioStatus.featuresOK | VirtioStatus.driverOK)
            } else {
                s.negotiated = s.driverFeatures
            }
        }
        s.status = new | deviceBits
        if added & VirtioStatus.driverOK != 0, new & VirtioStatus.driverOK != 0 {
            do {
                try device.activate(features: s.negotiated)
            } catch {
                diagnostics.record(error)
                enterNeedsReset(&s)
                return
            }
            // Buffers the driver posted (and notified) before DRIVER_OK were left alone.
            for i in s.queues.indices { process(i, &s) }
        }
    }

    private func reset(_ s: inout State) {
        s.status = 0
        s.deviceFeaturesSel = 0
        s.driverFeaturesSel = 0
        s.driverFeatures = 0
        s.driverFeaturesBeyond64 = false
        s.negotiated = 0
        s.queueSel = 0
        for i in s.queues.indices { s.queues[i].reset() }
        s.interruptStatus = 0
        updateLine(&s)
        device.reset()
    }

    // MARK: Queues

    /// Applies `change` to the selected queue if the protocol allows configuring it now.
    /// One half of a ring address: the queue takes the whole address through its validating
    /// setter (alignment is the driver's to get right once both halves are written, so it is
    /// checked when the queue is enabled).
    private func setRing(_ ring: VirtqueueRing, _ s: inout State, _ combine: (UInt64) -> UInt64) {
        configureQueue(&s) { q throws(VirtioDriverError) in
            let current: UInt64
            switch ring {
            case .descriptorTable: current = q.descriptorTable
            case .availableRing: current = q.availableRing
            case .usedRing: current = q.usedRing
            }
            try Self.queueChange(q.index) { () throws(VirtqueueError) in try q.trySetAddress(ring, combine(current), checkAlignment: false) }
        }
    }

    /// Runs a queue setter; its error becomes the driver error the diagnostics record.
    private static func queueChange(_ queue: Int, _ body: () throws(VirtqueueError) -> Void) throws(VirtioDriverError) {
        do { try body() } catch { throw .invalidQueueLayout(queue: UInt32(queue), error) }
    }

    private func configureQueue(_ s: inout State, _ change: (inout VirtioQueue) throws(VirtioDriverError) -> Void) {
        let sel = Int(s.queueSel)
        guard s.queues.indices.contains(sel) else {
            diagnostics.record(VirtioDriverError.noSuchQueue(s.queueSel))
            return
        }
        guard s.status & VirtioStatus.featuresOK != 0, s.status & VirtioStatus.driverOK == 0,
              !s.queues[sel].isReady else {
            diagnostics.record(VirtioDriverError.queueConfigurationNotAllowed(
                queue: s.queueSel, status: s.status, queueReady: s.queues[sel].isReady))
            return
        }
        do { try change(&s.queues[sel]) } catch { diagnostics.record(error) }
    }

    private func writeQueueReady(_ v: UInt32, _ s: inout State) {
        let sel = Int(s.queueSel)
        guard s.queues.indices.contains(sel) else {
            diagnostics.record(VirtioDriverError.noSuchQueue(s.queueSel))
            return
        }
        if v & 1 == 0 {
            // Stopping a queue is always allowed (drivers do it while tearing down).
            s.queues[sel].disable()
            return
        }
        guard !s.queues[sel].isReady else { return }
        configureQueue(&s) { q throws(VirtioDriverError) in
            do throws(VirtqueueError) { try q.enable(in: memory) } catch {
                throw .invalidQueueLayout(queue: UInt32(sel), error)
            }
        }
    }

    /// Lets the device work on queue `index`, then raises a used-buffer interrupt if it
    /// returned buffers. A ring-level fault puts the device into DEVICE_NEEDS_RESET.
    private func process(_ index: Int, _ s: inout State) {
        guard s.isLive, s.queues[index].isReady else { return }
        s.queues[index].countNotification()
        do {
            try device.process(queue: index, &s.queues[index], memory: memory, diagnostics: diagnostics)
        } catch {
            diagnostics.record(QueueFault(queue: index, error: error))
            enterNeedsReset(&s)
        }
        if s.queues[index].takeInterruptRequest(in: memory) { raise(VirtioInterrupt.usedBuffer, &s) }
    }

    private func enterNeedsReset(_ s: inout State) {
        s.status |= VirtioStatus.deviceNeedsReset
        raise(VirtioInterrupt.configurationChange, &s)
    }

    private func raise(_ bits: UInt32, _ s: inout State) {
        s.interruptStatus |= bits
        updateLine(&s)
    }

    private func updateLine(_ s: inout State) {
        let asserted = s.interruptStatus != 0
        guard asserted != s.lineAsserted else { return }
        s.lineAsserted = asserted
        interrupt?(asserted)
    }
}
