import VirtCore

/// The transport-independent half of a virtio device's interface (virtio 1.x §2–3):
/// device status, feature negotiation, queue configuration and processing, access to the
/// device's configuration space, and the interrupts all that raises. Both transports keep
/// one under their lock and map their registers onto it (`VirtioMMIOTransport`'s register
/// file, `VirtioPCITransport`'s common configuration structure), so the protocol rules
/// and the queues are the same whichever bus a device sits on.
///
/// Protocol violations are recorded in `diagnostics` and ignored (the register keeps its
/// value); a ring-level fault sets DEVICE_NEEDS_RESET. All state a snapshot needs is here.
struct VirtioFunction: Sendable {
    let device: any VirtioDevice
    let memory: GuestMemory
    let diagnostics: VirtioDiagnostics
    /// Device features as the driver reads them: the device's plus VERSION_1.
    let offeredFeatures: UInt64

    var status: UInt8 = 0
    var deviceFeaturesSel: UInt32 = 0
    var driverFeaturesSel: UInt32 = 0
    var driverFeatures: UInt64 = 0
    /// The driver set a bit in a feature word beyond bit 63: never acceptable.
    var driverFeaturesBeyond64 = false
    var negotiated: UInt64 = 0
    var queueSel: UInt32 = 0
    var queues: [VirtioQueue]
    /// virtio-mmio's InterruptStatus, virtio-pci's ISR: raised and not yet acknowledged.
    var interruptStatus: UInt32 = 0
    /// Queues (bit i: queue i, the last bit for queues beyond 63) that returned buffers
    /// since the transport last delivered, and whether the configuration-change
    /// interrupt was raised meanwhile. A transport with per-queue interrupts reads these.
    var raisedQueues: UInt64 = 0
    var configurationRaised = false
    /// Frozen for a snapshot: host-initiated processing is deferred (the queues to process later).
    var frozen = false
    var deferredQueues: Set<Int> = []
    var configGeneration: UInt32 = 0

    /// Never offered, whatever a device claims: this implementation lacks them.
    static let unsupportedFeatures = VirtioFeature.indirectDescriptors | VirtioFeature.eventIndex
        | VirtioFeature.accessPlatform | VirtioFeature.ringPacked

    init(device: any VirtioDevice, memory: GuestMemory, diagnostics: VirtioDiagnostics) {
        self.device = device
        self.memory = memory
        self.diagnostics = diagnostics
        offeredFeatures = (device.offeredFeatures & ~Self.unsupportedFeatures) | VirtioFeature.version1
        queues = device.queueMaxSizes.enumerated().map { VirtioQueue(index: $0.offset, maxSize: $0.element) }
    }

    /// The device may consume buffers: DRIVER_OK set, no error state.
    var isLive: Bool {
        status & VirtioStatus.driverOK != 0
            && status & (VirtioStatus.deviceNeedsReset | VirtioStatus.failed) == 0
    }

    /// The selected queue's index, or nil when QueueSel names no queue.
    var selectedQueue: Int? { queues.indices.contains(Int(queueSel)) ? Int(queueSel) : nil }

    /// The 32-bit word of the offered features that DeviceFeaturesSel selects.
    var deviceFeatureWord: UInt32 {
        switch deviceFeaturesSel {
        case 0: return UInt32(truncatingIfNeeded: offeredFeatures)
        case 1: return UInt32(truncatingIfNeeded: offeredFeatures >> 32)
        default: return 0
        }
    }

    /// The 32-bit word of the driver's features that DriverFeaturesSel selects.
    var driverFeatureWord: UInt32 {
        switch driverFeaturesSel {
        case 0: return UInt32(truncatingIfNeeded: driverFeatures)
        case 1: return UInt32(truncatingIfNeeded: driverFeatures >> 32)
        default: return 0
        }
    }

    // MARK: Configuration space

    func readConfig(offset: UInt64, size: UInt8) -> UInt64 {
        let bytes = device.configSpace()
        guard [1, 2, 4, 8].contains(size), offset < UInt64(bytes.count),
              UInt64(size) <= UInt64(bytes.count) - offset else {
            diagnostics.record(VirtioDriverError.configAccess(offset: offset, size: size, configSize: bytes.count))
            return 0
        }
        var value: UInt64 = 0
        for i in 0..<Int(size) { value |= UInt64(bytes[Int(offset) + i]) << (8 * UInt64(i)) }
        return value
    }

    func writeConfig(offset: UInt64, size: UInt8, value: UInt64) {
        let count = device.configSpace().count
        guard [1, 2, 4, 8].contains(size), offset < UInt64(count), UInt64(size) <= UInt64(count) - offset else {
            diagnostics.record(VirtioDriverError.configAccess(offset: offset, size: size, configSize: count))
            return
        }
        let bytes = (0..<Int(size)).map { UInt8(truncatingIfNeeded: value >> (8 * UInt64($0))) }
        device.writeConfig(offset: Int(offset), bytes: bytes)
    }

    /// The device's configuration changed: ConfigGeneration moves on, and a driver that has
    /// finished initialisation is told.
    mutating func configurationChanged() {
        configGeneration &+= 1
        if status & VirtioStatus.driverOK != 0 { raise(VirtioInterrupt.configurationChange) }
    }

    // MARK: Feature negotiation and status

    mutating func writeDriverFeatures(_ v: UInt32) {
        guard status & VirtioStatus.driver != 0, status & VirtioStatus.featuresOK == 0 else {
            diagnostics.record(VirtioDriverError.featuresWrittenOutOfOrder(status: status))
            return
        }
        switch driverFeaturesSel {
        case 0: driverFeatures = (driverFeatures & 0xFFFF_FFFF_0000_0000) | UInt64(v)
        case 1: driverFeatures = (driverFeatures & 0xFFFF_FFFF) | (UInt64(v) << 32)
        default: if v != 0 { driverFeaturesBeyond64 = true }
        }
    }

    private func featureProblem() -> VirtioDriverError? {
        let requested = driverFeatures
        if requested & ~offeredFeatures != 0 || driverFeaturesBeyond64 {
            return .unofferedFeatures(requested: requested, offered: offeredFeatures)
        }
        if requested & VirtioFeature.version1 == 0 { return .missingVersion1(requested: requested) }
        if !device.accepts(features: requested) { return .featuresRefusedByDevice(requested: requested) }
        return nil
    }

    mutating func writeStatus(_ value: UInt8) {
        if value == 0 {
            reset()
            return
        }
        let deviceBits = status & VirtioStatus.deviceNeedsReset
        let old = status & ~VirtioStatus.deviceNeedsReset
        // DEVICE_NEEDS_RESET belongs to the device; a driver echoing it back is harmless.
        var new = value & ~VirtioStatus.deviceNeedsReset
        let stepsInOrder = (new & VirtioStatus.driver == 0 || new & VirtioStatus.acknowledge != 0)
            && (new & VirtioStatus.featuresOK == 0 || new & VirtioStatus.driver != 0)
            && (new & VirtioStatus.driverOK == 0 || new & VirtioStatus.featuresOK != 0)
        guard new & ~VirtioStatus.driverWritable == 0, new & old == old, stepsInOrder else {
            diagnostics.record(VirtioDriverError.invalidStatusTransition(from: status, to: value))
            return
        }
        let added = new & ~old
        if added & VirtioStatus.featuresOK != 0 {
            if let problem = featureProblem() {
                // Spec 3.1.1: the device leaves FEATURES_OK clear; the driver re-reads
                // Status, sees that, and gives up. DRIVER_OK cannot stand without it.
                diagnostics.record(problem)
                new &= ~(VirtioStatus.featuresOK | VirtioStatus.driverOK)
            } else {
                negotiated = driverFeatures
            }
        }
        status = new | deviceBits
        if added & VirtioStatus.driverOK != 0, new & VirtioStatus.driverOK != 0 {
            do {
                try device.activate(features: negotiated)
            } catch {
                diagnostics.record(error)
                enterNeedsReset()
                return
            }
            // Buffers the driver posted (and notified) before DRIVER_OK were left alone.
            for i in queues.indices { process(i) }
        }
    }

    mutating func reset() {
        status = 0
        deviceFeaturesSel = 0
        driverFeaturesSel = 0
        driverFeatures = 0
        driverFeaturesBeyond64 = false
        negotiated = 0
        queueSel = 0
        for i in queues.indices { queues[i].reset() }
        interruptStatus = 0
        raisedQueues = 0
        configurationRaised = false
        device.reset()
    }

    // MARK: Queues

    /// QueueNum / queue_size: a power of two up to the queue's maximum.
    mutating func setQueueSize(_ v: UInt32) {
        let sel = queueSel
        configureQueue { q throws(VirtioDriverError) in
            guard v > 0, v <= UInt32(q.maxSize), v & (v - 1) == 0 else {
                throw .invalidQueueSize(queue: sel, size: UInt64(v), max: q.maxSize)
            }
            try Self.queueChange(q.index) { () throws(VirtqueueError) in try q.trySetSize(UInt16(v)) }
        }
    }

    /// One half (or all) of a ring address: the queue takes the whole address through its
    /// validating setter (alignment is the driver's to get right once both halves are
    /// written, so it is checked when the queue is enabled).
    mutating func setRing(_ ring: VirtqueueRing, _ combine: (UInt64) -> UInt64) {
        configureQueue { q throws(VirtioDriverError) in
            let current: UInt64
            switch ring {
            case .descriptorTable: current = q.descriptorTable
            case .availableRing: current = q.availableRing
            case .usedRing: current = q.usedRing
            }
            try Self.queueChange(q.index) { () throws(VirtqueueError) in try q.trySetAddress(ring, combine(current), checkAlignment: false) }
        }
    }

    static func low(_ v: UInt32, _ old: UInt64) -> UInt64 { (old & 0xFFFF_FFFF_0000_0000) | UInt64(v) }
    static func high(_ v: UInt32, _ old: UInt64) -> UInt64 { (old & 0xFFFF_FFFF) | (UInt64(v) << 32) }

    /// Runs a queue setter; its error becomes the driver error the diagnostics record.
    private static func queueChange(_ queue: Int, _ body: () throws(VirtqueueError) -> Void) throws(VirtioDriverError) {
        do { try body() } catch { throw .invalidQueueLayout(queue: UInt32(queue), error) }
    }

    /// Applies `change` to the selected queue if the protocol allows configuring it now.
    private mutating func configureQueue(_ change: (inout VirtioQueue) throws(VirtioDriverError) -> Void) {
        guard let sel = selectedQueue else {
            diagnostics.record(VirtioDriverError.noSuchQueue(queueSel))
            return
        }
        guard status & VirtioStatus.featuresOK != 0, status & VirtioStatus.driverOK == 0,
              !queues[sel].isReady else {
            diagnostics.record(VirtioDriverError.queueConfigurationNotAllowed(
                queue: queueSel, status: status, queueReady: queues[sel].isReady))
            return
        }
        do { try change(&queues[sel]) } catch { diagnostics.record(error) }
    }

    mutating func writeQueueReady(_ v: UInt32) {
        guard let sel = selectedQueue else {
            diagnostics.record(VirtioDriverError.noSuchQueue(queueSel))
            return
        }
        if v & 1 == 0 {
            // Stopping a queue is always allowed (drivers do it while tearing down).
            queues[sel].disable()
            return
        }
        guard !queues[sel].isReady else { return }
        let memory = memory
        configureQueue { q throws(VirtioDriverError) in
            do throws(VirtqueueError) { try q.enable(in: memory) } catch {
                throw .invalidQueueLayout(queue: UInt32(sel), error)
            }
        }
    }

    /// The driver notified queue `index` (a value it wrote: checked here).
    mutating func notify(_ index: UInt32) {
        guard queues.indices.contains(Int(index)) else {
            diagnostics.record(VirtioDriverError.noSuchQueue(index))
            return
        }
        process(Int(index))
    }

    /// The host has work for queue `index`: processed now, or later if frozen.
    mutating func hostRequestsProcessing(_ index: Int) {
        guard queues.indices.contains(index) else { return }
        if frozen { deferredQueues.insert(index); return }
        process(index)
    }

    /// Lets the device work on queue `index`, then raises a used-buffer interrupt if it
    /// returned buffers. A ring-level fault puts the device into DEVICE_NEEDS_RESET.
    mutating func process(_ index: Int) {
        guard isLive, queues[index].isReady else { return }
        queues[index].countNotification()
        do {
            try device.process(queue: index, &queues[index], memory: memory, diagnostics: diagnostics)
        } catch {
            diagnostics.record(QueueFault(queue: index, error: error))
            enterNeedsReset()
        }
        if queues[index].takeInterruptRequest(in: memory) {
            raisedQueues |= 1 << UInt64(min(index, 63))
            raise(VirtioInterrupt.usedBuffer)
        }
    }

    mutating func enterNeedsReset() {
        status |= VirtioStatus.deviceNeedsReset
        raise(VirtioInterrupt.configurationChange)
    }

    mutating func raise(_ bits: UInt32) {
        interruptStatus |= bits
        if bits & VirtioInterrupt.configurationChange != 0 { configurationRaised = true }
    }

    /// Hands the transport what was raised since it last asked, and forgets it.
    mutating func takeRaised() -> (queues: UInt64, configuration: Bool) {
        defer { raisedQueues = 0; configurationRaised = false }
        return (raisedQueues, configurationRaised)
    }
}
