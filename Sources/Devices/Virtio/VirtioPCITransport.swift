import Synchronization
import VirtCore

/// A driver broke the virtio-pci register protocol (virtio 1.x §4.1.4). The offending
/// access is ignored (reads give 0) and counted.
public enum VirtioPCIDriverError: VirtioFault, Equatable {
    /// Common configuration fields take accesses of their own width, aligned (64-bit
    /// fields also as two 32-bit halves).
    case accessSize(offset: UInt64, size: UInt8)
    /// An access in a BAR outside every structure the capabilities describe.
    case outsideStructures(bar: Int, offset: UInt64, size: UInt8)
    case writeToReadOnly(field: String)
    /// An MSI-X vector beyond the table (the field then reads NO_VECTOR, spec 4.1.5.1.2).
    case vectorOutOfRange(vector: UInt16, vectors: Int)
    /// A notification for a queue that does not exist.
    case noSuchQueue(notifyOffset: UInt64)

    public var kind: String {
        switch self {
        case .accessSize: return "pciAccessSize"
        case .outsideStructures: return "pciOutsideStructures"
        case .writeToReadOnly: return "pciWriteToReadOnly"
        case .vectorOutOfRange: return "msixVectorOutOfRange"
        case .noSuchQueue: return "pciNotifyNoSuchQueue"
        }
    }

    public var description: String {
        func hex<T: BinaryInteger>(_ v: T) -> String { "0x" + String(v, radix: 16) }
        switch self {
        case let .accessSize(offset, size):
            return "\(size)-byte access at \(hex(offset)) of the common configuration (fields take aligned accesses of their own width)"
        case let .outsideStructures(bar, offset, size):
            return "\(size)-byte access at \(hex(offset)) of BAR \(bar) lies outside the virtio structures"
        case let .writeToReadOnly(field):
            return "write to read-only field \(field)"
        case let .vectorOutOfRange(vector, vectors):
            return "MSI-X vector \(vector) is beyond the table's \(vectors) vectors (reads back NO_VECTOR)"
        case let .noSuchQueue(offset):
            return "notification at \(hex(offset)) names no queue"
        }
    }
}

/// Why a device cannot be put behind a virtio-pci transport.
public enum VirtioPCIError: Error, Equatable, CustomStringConvertible {
    case tooManyQueues(Int)
    case configSpaceTooLarge(Int)

    public var description: String {
        switch self {
        case let .tooManyQueues(n): return "\(n) queues: virtio-pci here serves at most \(VirtioPCITransport.maxQueues)"
        case let .configSpaceTooLarge(n): return "a \(n)-byte device configuration space does not fit its 4 KiB region"
        }
    }
}

/// The virtio-pci transport, modern layout only (virtio 1.x §4.1), in front of the same
/// `VirtioDevice` models the virtio-mmio transport hosts; the protocol itself (status,
/// features, queues) is the shared `VirtioFunction`.
///
/// - Function: vendor 0x1AF4, device 0x1040 + the virtio device ID, revision 1; no INTx
///   (interrupt pin 0): interrupts are MSI-X only, one vector per queue plus one for
///   configuration changes, sent through `deliver`.
/// - BAR 0 (16 KiB): common configuration at 0x0000, ISR at 0x1000, device configuration
///   at 0x2000, notifications at 0x3000 (queue i at 0x3000 + 4·i; notify_off_multiplier 4).
///   Vendor-specific capabilities (COMMON, ISR, DEVICE, NOTIFY) point there.
/// - BAR 1 (4 KiB): the MSI-X table, the PBA at 0x800.
///
/// Not offered: the PCI_CFG access capability (Linux does not use it) and legacy mode.
public final class VirtioPCITransport: PCIDevice, VirtioTransportHandle, Sendable {
    public static let vendorID: UInt16 = 0x1AF4
    public static let deviceIDBase: UInt16 = 0x1040
    public static let maxQueues = 63
    /// MSI-X "no vector" (spec 4.1.5.1.2).
    public static let noVector: UInt16 = 0xFFFF
    /// Vendor-specific capability types (spec 4.1.4).
    public enum CapabilityType: UInt8, Sendable {
        case common = 1, notify = 2, isr = 3, device = 4, pciConfig = 5
    }
    public static let structuresBAR = 0, msixBAR = 1
    public static let structuresBARSize: UInt32 = 0x4000
    public static let commonOffset: UInt64 = 0x0000, commonLength: UInt64 = 0x40
    public static let isrOffset: UInt64 = 0x1000
    public static let deviceOffset: UInt64 = 0x2000
    public static let notifyOffset: UInt64 = 0x3000
    public static let notifyMultiplier: UInt64 = 4

    /// Offsets in the common configuration structure (spec 4.1.4.3).
    enum Common {
        static let deviceFeatureSelect: UInt64 = 0x00
        static let deviceFeature: UInt64 = 0x04
        static let driverFeatureSelect: UInt64 = 0x08
        static let driverFeature: UInt64 = 0x0C
        static let configMSIXVector: UInt64 = 0x10
        static let numQueues: UInt64 = 0x12
        static let deviceStatus: UInt64 = 0x14
        static let configGeneration: UInt64 = 0x15
        static let queueSelect: UInt64 = 0x16
        static let queueSize: UInt64 = 0x18
        static let queueMSIXVector: UInt64 = 0x1A
        static let queueEnable: UInt64 = 0x1C
        static let queueNotifyOff: UInt64 = 0x1E
        static let queueDesc: UInt64 = 0x20
        static let queueDriver: UInt64 = 0x28
        static let queueDevice: UInt64 = 0x30
        static let queueNotifyData: UInt64 = 0x38
        static let queueReset: UInt64 = 0x3A

        /// The width of the field at `offset` (nil: none starts there).
        static func width(at offset: UInt64) -> UInt8? {
            switch offset {
            case deviceFeatureSelect, deviceFeature, driverFeatureSelect, driverFeature: return 4
            case configMSIXVector, numQueues, queueSelect, queueSize, queueMSIXVector, queueEnable,
                 queueNotifyOff, queueNotifyData, queueReset: return 2
            case deviceStatus, configGeneration: return 1
            case queueDesc, queueDriver, queueDevice: return 8
            default: return nil
            }
        }
    }

    /// Everything the transport keeps, in one value (a snapshot saves it: VirtioPCITransportSnapshot.swift).
    struct State: Sendable {
        var function: VirtioFunction
        var msix: MSIX
        /// The MSI-X message control register as the driver last wrote it.
        var msixControl: UInt16 = 0
        var configVector: UInt16 = VirtioPCITransport.noVector
        var queueVectors: [UInt16]
    }

    public typealias MessageSink = @Sendable (MSIX.Message) -> Void

    public let name: String
    public let device: any VirtioDevice
    public let memory: GuestMemory
    public let diagnostics: VirtioDiagnostics
    /// The function's configuration space as the bridge is to start it.
    public let configuration: PCIConfigSpace
    private let deviceConfigLength: Int
    private let queueCount: Int
    private let deliver: MessageSink?
    let state: Mutex<State>

    /// - Parameters:
    ///   - deliver: where MSI-X messages go (the platform's interrupt path; nil: none, as in tests).
    ///   - log: where first-of-their-kind faults are reported (default: stderr).
    public init(device: any VirtioDevice, memory: GuestMemory, deliver: MessageSink?, name: String? = nil,
                log: @escaping VirtioDiagnostics.LogSink = VirtioDiagnostics.standardError) throws(VirtioPCIError) {
        let queueCount = device.queueMaxSizes.count
        guard queueCount <= Self.maxQueues else { throw .tooManyQueues(queueCount) }
        let configLength = device.configSpace().count
        guard configLength <= 0x1000 else { throw .configSpaceTooLarge(configLength) }
        let name = name ?? device.name
        self.name = name
        self.device = device
        self.memory = memory
        self.deliver = deliver
        self.queueCount = queueCount
        deviceConfigLength = configLength
        let diagnostics = VirtioDiagnostics(deviceName: name, log: log)
        self.diagnostics = diagnostics

        var config = PCIConfigSpace(vendor: Self.vendorID, device: Self.deviceIDBase + UInt16(truncatingIfNeeded: device.deviceID.rawValue),
                                    classCode: Self.classCode(device.deviceID), revision: 1)
        config.set16(0x2C, Self.vendorID)  // subsystem vendor
        config.set16(0x2E, 0x1100)         // subsystem ID, as QEMU's devices have it
        config.addMemoryBAR(Self.structuresBAR, size: Self.structuresBARSize)
        config.addMemoryBAR(Self.msixBAR, size: 0x1000)
        Self.addStructure(.common, offset: Self.commonOffset, length: Self.commonLength, to: &config)
        Self.addStructure(.isr, offset: Self.isrOffset, length: 4, to: &config)
        if configLength > 0 { Self.addStructure(.device, offset: Self.deviceOffset, length: UInt64(configLength), to: &config) }
        Self.addStructure(.notify, offset: Self.notifyOffset, length: Self.notifyMultiplier * UInt64(max(1, queueCount)),
                          extra: UInt32(Self.notifyMultiplier), to: &config)
        let msix = MSIX(vectors: queueCount + 1, bar: Self.msixBAR, in: &config)
        configuration = config
        state = Mutex(State(function: VirtioFunction(device: device, memory: memory, diagnostics: diagnostics), msix: msix,
                            queueVectors: Array(repeating: Self.noVector, count: queueCount)))
        device.attach(to: self)
    }

    /// The PCI class a driver-less OS shows the function as.
    static func classCode(_ id: VirtioDeviceID) -> UInt32 {
        switch id {
        case .network: return 0x02_0000  // Ethernet controller
        case .block: return 0x01_0000    // mass storage (SCSI), as QEMU has it
        case .console: return 0x07_8000  // other communication controller
        default: return 0xFF_0000
        }
    }

    /// A virtio_pci_cap (spec 4.1.4): cap_len, cfg_type, bar, id, padding, offset, length
    /// (and notify_off_multiplier for NOTIFY).
    private static func addStructure(_ type: CapabilityType, offset: UInt64, length: UInt64, extra: UInt32? = nil,
                                     to config: inout PCIConfigSpace) {
        func le32(_ v: UInt32) -> [UInt8] { (0..<4).map { UInt8(truncatingIfNeeded: v >> (8 * UInt32($0))) } }
        var body: [UInt8] = [0, type.rawValue, UInt8(structuresBAR), 0, 0, 0]
        body += le32(UInt32(offset)) + le32(UInt32(length))
        if let extra { body += le32(extra) }
        body[0] = UInt8(2 + body.count)
        config.addCapability(id: 0x09, body: body)
    }

    // MARK: Host-side view (VMM, tests)

    public var status: UInt8 { state.withLock { $0.function.status } }
    public var negotiatedFeatures: UInt64 { state.withLock { $0.function.negotiated } }
    public var needsReset: Bool { state.withLock { $0.function.status & VirtioStatus.deviceNeedsReset != 0 } }
    public func queue(_ index: Int) -> VirtioQueue? {
        state.withLock { s in s.function.queues.indices.contains(index) ? s.function.queues[index] : nil }
    }
    /// The MSI-X vector queue `index` signals (NO_VECTOR: none).
    public func queueVector(_ index: Int) -> UInt16? {
        state.withLock { s in s.queueVectors.indices.contains(index) ? s.queueVectors[index] : nil }
    }

    // MARK: VirtioTransportHandle

    public func processQueue(_ index: Int) {
        state.withLock { s in
            s.function.hostRequestsProcessing(index)
            signalRaised(&s)
        }
        device.performDeferredWork()
    }

    public func configurationChanged() {
        state.withLock { s in
            s.function.configurationChanged()
            signalRaised(&s)
        }
    }

    // MARK: PCIDevice

    public func configWritten(function: RequesterID, offset: Int, size: Int, config: inout PCIConfigSpace) -> [RequesterID: PCIConfigSpace]? {
        state.withLock { s in
            guard s.msix.covers(offset, size: size) else { return }
            s.msixControl = s.msix.control(config)
            for message in s.msix.releasePending(control: s.msixControl) { deliver?(message) }
        }
        return nil
    }

    public func barRead(function: RequesterID, bar: Int, offset: UInt64, size: UInt8, config: PCIConfigSpace) -> UInt64 {
        if bar == Self.msixBAR { return state.withLock { $0.msix.read(offset: offset, size: size) } }
        return state.withLock { s -> UInt64 in
            switch offset {
            case Self.commonOffset..<(Self.commonOffset + Self.commonLength):
                return readCommon(offset - Self.commonOffset, size: size, &s)
            case Self.isrOffset..<(Self.isrOffset + 4):
                // Reading the ISR acknowledges it (spec 4.1.4.5); there is no INTx line to lower.
                guard offset == Self.isrOffset else { return 0 }
                defer { s.function.interruptStatus = 0 }
                return UInt64(s.function.interruptStatus & 3)
            case Self.deviceOffset..<(Self.deviceOffset + UInt64(deviceConfigLength)):
                return s.function.readConfig(offset: offset - Self.deviceOffset, size: size)
            case Self.notifyOffset..<(Self.notifyOffset + Self.notifyMultiplier * UInt64(queueCount)):
                return 0  // notifications are write-only
            default:
                diagnostics.record(VirtioPCIDriverError.outsideStructures(bar: bar, offset: offset, size: size))
                return 0
            }
        }
    }

    public func barWrite(function: RequesterID, bar: Int, offset: UInt64, size: UInt8, value: UInt64, config: PCIConfigSpace) {
        if bar == Self.msixBAR {
            state.withLock { s in
                s.msix.write(offset: offset, size: size, value: value)
                for message in s.msix.releasePending(control: s.msixControl) { deliver?(message) }
            }
            return
        }
        state.withLock { s in
            switch offset {
            case Self.commonOffset..<(Self.commonOffset + Self.commonLength):
                writeCommon(offset - Self.commonOffset, size: size, value: value, &s)
            case Self.isrOffset..<(Self.isrOffset + 4):
                diagnostics.record(VirtioPCIDriverError.writeToReadOnly(field: "ISR"))
            case Self.deviceOffset..<(Self.deviceOffset + UInt64(deviceConfigLength)):
                s.function.writeConfig(offset: offset - Self.deviceOffset, size: size, value: value)
            case Self.notifyOffset..<(Self.notifyOffset + Self.notifyMultiplier * UInt64(Self.maxQueues)):
                // The address names the queue (no VIRTIO_F_NOTIFICATION_DATA: the value is its index).
                let relative = offset - Self.notifyOffset
                guard relative % Self.notifyMultiplier == 0, relative / Self.notifyMultiplier < UInt64(queueCount) else {
                    diagnostics.record(VirtioPCIDriverError.noSuchQueue(notifyOffset: relative))
                    return
                }
                s.function.notify(UInt32(relative / Self.notifyMultiplier))
            default:
                diagnostics.record(VirtioPCIDriverError.outsideStructures(bar: bar, offset: offset, size: size))
            }
            signalRaised(&s)
        }
        device.performDeferredWork()
    }

    // MARK: Common configuration

    /// The field an access at `offset` of `size` bytes is to, and the byte offset into it
    /// (nonzero only for the upper half of a 64-bit field). Nil: a malformed access.
    private func commonField(_ offset: UInt64, size: UInt8) -> (field: UInt64, shift: UInt64)? {
        if let width = Common.width(at: offset), size == width || (width == 8 && size == 4) { return (offset, 0) }
        if size == 4, offset >= 4, Common.width(at: offset - 4) == 8 { return (offset - 4, 32) }
        diagnostics.record(VirtioPCIDriverError.accessSize(offset: offset, size: size))
        return nil
    }

    private func readCommon(_ offset: UInt64, size: UInt8, _ s: inout State) -> UInt64 {
        guard let (field, shift) = commonField(offset, size: size) else { return 0 }
        let sel = s.function.selectedQueue
        let value: UInt64
        switch field {
        case Common.deviceFeatureSelect: value = UInt64(s.function.deviceFeaturesSel)
        case Common.deviceFeature: value = UInt64(s.function.deviceFeatureWord)
        case Common.driverFeatureSelect: value = UInt64(s.function.driverFeaturesSel)
        case Common.driverFeature: value = UInt64(s.function.driverFeatureWord)
        case Common.configMSIXVector: value = UInt64(s.configVector)
        case Common.numQueues: value = UInt64(queueCount)
        case Common.deviceStatus: value = UInt64(s.function.status)
        case Common.configGeneration: value = UInt64(UInt8(truncatingIfNeeded: s.function.configGeneration))
        case Common.queueSelect: value = UInt64(s.function.queueSel)
        // An absent queue reads size 0, which tells the driver it is not there.
        case Common.queueSize: value = sel.map { UInt64(s.function.queues[$0].size) } ?? 0
        case Common.queueMSIXVector: value = sel.map { UInt64(s.queueVectors[$0]) } ?? UInt64(Self.noVector)
        case Common.queueEnable: value = sel.map { s.function.queues[$0].isReady ? 1 : 0 } ?? 0
        case Common.queueNotifyOff: value = sel.map { UInt64($0) } ?? 0
        case Common.queueDesc: value = sel.map { s.function.queues[$0].descriptorTable } ?? 0
        case Common.queueDriver: value = sel.map { s.function.queues[$0].availableRing } ?? 0
        case Common.queueDevice: value = sel.map { s.function.queues[$0].usedRing } ?? 0
        default: value = 0  // queue_notify_data (no NOTIFICATION_DATA), queue_reset (no RING_RESET)
        }
        return size == 8 ? value : (value >> shift) & ((1 << (8 * UInt64(size))) - 1)
    }

    private func writeCommon(_ offset: UInt64, size: UInt8, value: UInt64, _ s: inout State) {
        guard let (field, shift) = commonField(offset, size: size) else { return }
        let v32 = UInt32(truncatingIfNeeded: value)
        switch field {
        case Common.deviceFeatureSelect: s.function.deviceFeaturesSel = v32
        case Common.driverFeatureSelect: s.function.driverFeaturesSel = v32
        case Common.driverFeature: s.function.writeDriverFeatures(v32)
        case Common.configMSIXVector: s.configVector = checkedVector(UInt16(truncatingIfNeeded: value), s)
        case Common.deviceStatus:
            s.function.writeStatus(UInt8(truncatingIfNeeded: value))
            if s.function.status == 0 {
                s.configVector = Self.noVector
                for i in s.queueVectors.indices { s.queueVectors[i] = Self.noVector }
            }
        case Common.queueSelect: s.function.queueSel = UInt32(UInt16(truncatingIfNeeded: value))
        case Common.queueSize: s.function.setQueueSize(UInt32(UInt16(truncatingIfNeeded: value)))
        case Common.queueMSIXVector:
            guard let sel = s.function.selectedQueue else {
                diagnostics.record(VirtioDriverError.noSuchQueue(s.function.queueSel))
                return
            }
            s.queueVectors[sel] = checkedVector(UInt16(truncatingIfNeeded: value), s)
        case Common.queueEnable: s.function.writeQueueReady(UInt32(UInt16(truncatingIfNeeded: value)))
        case Common.queueDesc: setRing(.descriptorTable, size: size, shift: shift, value: value, &s)
        case Common.queueDriver: setRing(.availableRing, size: size, shift: shift, value: value, &s)
        case Common.queueDevice: setRing(.usedRing, size: size, shift: shift, value: value, &s)
        case Common.queueReset: diagnostics.record(VirtioDriverError.unknownRegister(offset: Self.commonOffset + field))
        default: diagnostics.record(VirtioPCIDriverError.writeToReadOnly(field: Self.commonFieldName(field)))
        }
    }

    private func setRing(_ ring: VirtqueueRing, size: UInt8, shift: UInt64, value: UInt64, _ s: inout State) {
        if size == 8 { s.function.setRing(ring) { _ in value }; return }
        let half = UInt32(truncatingIfNeeded: value)
        s.function.setRing(ring) { shift == 0 ? VirtioFunction.low(half, $0) : VirtioFunction.high(half, $0) }
    }

    private func checkedVector(_ vector: UInt16, _ s: State) -> UInt16 {
        guard vector == Self.noVector || Int(vector) < s.msix.vectors else {
            diagnostics.record(VirtioPCIDriverError.vectorOutOfRange(vector: vector, vectors: s.msix.vectors))
            return Self.noVector
        }
        return vector
    }

    private static func commonFieldName(_ offset: UInt64) -> String {
        switch offset {
        case Common.deviceFeature: return "device_feature"
        case Common.numQueues: return "num_queues"
        case Common.configGeneration: return "config_generation"
        case Common.queueNotifyOff: return "queue_notify_off"
        case Common.queueNotifyData: return "queue_notify_data"
        default: return "common+0x" + String(offset, radix: 16)
        }
    }

    // MARK: Interrupts

    /// Sends the MSI-X messages for what the function raised: each queue's vector, the
    /// configuration vector. Without MSI-X enabled nothing is sent (no INTx); the ISR
    /// still records it.
    private func signalRaised(_ s: inout State) {
        let (queues, configuration) = s.function.takeRaised()
        guard queues != 0 || configuration else { return }
        if configuration { signal(s.configVector, &s) }
        var remaining = queues
        while remaining != 0 {
            let q = remaining.trailingZeroBitCount
            remaining &= remaining - 1
            if q < s.queueVectors.count { signal(s.queueVectors[q], &s) }
        }
    }

    private func signal(_ vector: UInt16, _ s: inout State) {
        guard vector != Self.noVector, let message = s.msix.signal(Int(vector), control: s.msixControl) else { return }
        deliver?(message)
    }
}
