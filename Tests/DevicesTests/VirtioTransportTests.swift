import Synchronization
import Testing
import VirtCore
@testable import Devices

/// A minimal device: two queues of at most 16, feature bit 0, an 8-byte config space
/// whose second word is writable. `process` completes every chain with used length 0.
final class VirtioEchoDevice: VirtioDevice {
    let name = "echo"
    var deviceID: VirtioDeviceID { VirtioDeviceID(rawValue: 42) }
    var offeredFeatures: UInt64 { 1 | VirtioFeature.indirectDescriptors }  // the transport must strip INDIRECT
    var queueMaxSizes: [UInt16] { [16, 16] }
    let config = Mutex<[UInt8]>([1, 2, 3, 4, 5, 6, 7, 8])
    let processed = Mutex<[Int]>([])
    let activations = Mutex<[UInt64]>([])
    let resets = Mutex(0)
    let refuseFeatureZero: Bool
    let transportHandle = Mutex(WeakTransport())

    init(refuseFeatureZero: Bool = false) { self.refuseFeatureZero = refuseFeatureZero }

    func configSpace() -> [UInt8] { config.withLock { $0 } }
    func writeConfig(offset: Int, bytes: [UInt8]) {
        config.withLock { c in for (i, b) in bytes.enumerated() where offset + i >= 4 { c[offset + i] = b } }
    }
    func accepts(features: UInt64) -> Bool { !(refuseFeatureZero && features & 1 != 0) }
    func attach(to transport: any VirtioTransportHandle) { transportHandle.withLock { $0 = WeakTransport(value: transport) } }
    func activate(features: UInt64) throws(VirtioDeviceError) { activations.withLock { $0.append(features) } }
    func reset() { resets.withLock { $0 += 1 } }
    func process(queue index: Int, _ queue: inout VirtioQueue, memory: GuestMemory,
                 diagnostics: VirtioDiagnostics) throws(VirtqueueError) {
        processed.withLock { $0.append(index) }
        while let chain = try queue.nextChain(from: memory, diagnostics: diagnostics) {
            try queue.addUsed(head: chain.head, length: 0, in: memory)
        }
    }
}

@Suite struct VirtioTransportTests {
    static let ackDriver = VirtioStatus.acknowledge | VirtioStatus.driver
    static let allButOK = ackDriver | VirtioStatus.featuresOK
    static let live = allButOK | VirtioStatus.driverOK

    @Test func identifiesItselfAsVersion2() throws {
        let g = try VirtioTestGuest(VirtioEchoDevice())
        #expect(g.reg(Reg.magicValue) == 0x7472_6976)
        #expect(g.reg(Reg.version) == 2)
        #expect(g.reg(Reg.deviceID) == 42)
        #expect(g.reg(Reg.vendorID) == 0x5356_4D56)
        #expect(g.deviceFeatures == 1 | VirtioFeature.version1)
        g.setReg(Reg.deviceFeaturesSel, 2)
        #expect(g.reg(Reg.deviceFeatures) == 0)
        g.setReg(Reg.queueSel, 1)
        #expect(g.reg(Reg.queueNumMax) == 16)
        g.setReg(Reg.queueSel, 2)
        #expect(g.reg(Reg.queueNumMax) == 0)
        #expect(g.reg(Reg.queueReady) == 0)
        #expect(g.reg(Reg.shmLenLow) == 0xFFFF_FFFF)
        #expect(g.reg(Reg.configGeneration) == 0)
        #expect(g.reg(Reg.queueDescLow) == 0)  // write-only reads as 0
        #expect(g.transport.diagnostics.errorCount == 0)
    }

    @Test func registersTakeOnlyAligned32BitAccesses() throws {
        let g = try VirtioTestGuest(VirtioEchoDevice())
        #expect(g.transport.mmioRead(offset: Reg.magicValue, size: 1) == 0)
        #expect(g.transport.mmioRead(offset: Reg.magicValue, size: 8) == 0)
        #expect(g.transport.mmioRead(offset: 0x2, size: 4) == 0)
        g.transport.mmioWrite(offset: Reg.status, size: 1, value: 1)
        #expect(g.status == 0)
        #expect(g.transport.diagnostics.count(of: "registerAccessSize") == 4)
        _ = g.reg(0x0E0)
        g.setReg(Reg.magicValue, 0)
        g.setReg(Reg.queueReset, 1)
        #expect(g.transport.diagnostics.count(of: "unknownRegister") == 2)
        #expect(g.transport.diagnostics.count(of: "writeToReadOnly") == 1)
        // Each kind is logged once, however often it happens.
        #expect(g.recorder.logLines.count == 3)
        #expect(g.recorder.logLines[0].contains("further registerAccessSize faults are counted"))
    }

    @Test func negotiatesAndActivates() throws {
        let device = VirtioEchoDevice()
        let g = try VirtioTestGuest(device)
        #expect(g.negotiate(VirtioFeature.version1 | 1))
        #expect(g.transport.negotiatedFeatures == VirtioFeature.version1 | 1)
        g.setUpQueue(0)
        g.setUpQueue(1, size: 4)
        #expect(g.reg(Reg.queueReady) == 1)
        g.setStatus(Self.live)
        #expect(g.status == Self.live)
        #expect(device.activations.withLock { $0 } == [VirtioFeature.version1 | 1])
        #expect(g.transport.queue(1)?.size == 4)
        #expect(g.transport.diagnostics.errorCount == 0)
    }

    @Test func featuresOKIsRefusedForUnofferedFeatures() throws {
        let g = try VirtioTestGuest(VirtioEchoDevice())
        #expect(!g.negotiate(VirtioFeature.version1 | 1 << 7))
        #expect(g.status == Self.ackDriver)
        #expect(g.transport.diagnostics.count(of: "unofferedFeatures") == 1)
        // INDIRECT was claimed by the device but is not offered by the transport.
        g.reset()
        #expect(!g.negotiate(VirtioFeature.version1 | VirtioFeature.indirectDescriptors))
        // Bits beyond 63 are never offered.
        g.reset()
        g.setStatus(VirtioStatus.acknowledge); g.setStatus(Self.ackDriver)
        g.writeDriverFeatures(VirtioFeature.version1)
        g.setReg(Reg.driverFeaturesSel, 2); g.setReg(Reg.driverFeatures, 1)
        g.setStatus(Self.allButOK)
        #expect(g.status == Self.ackDriver)
    }

    @Test func featuresOKIsRefusedWithoutVersion1() throws {
        let g = try VirtioTestGuest(VirtioEchoDevice())
        #expect(!g.negotiate(1))
        #expect(g.status & VirtioStatus.featuresOK == 0)
        #expect(g.transport.diagnostics.count(of: "missingVersion1") == 1)
        // Setting DRIVER_OK on top does not get through either.
        g.setStatus(Self.live)
        #expect(g.status == Self.ackDriver)
    }

    @Test func featuresOKIsRefusedWhenTheDeviceCannotWorkWithThem() throws {
        let g = try VirtioTestGuest(VirtioEchoDevice(refuseFeatureZero: true))
        #expect(!g.negotiate(VirtioFeature.version1 | 1))
        #expect(g.negotiate(VirtioFeature.version1))
    }

    @Test func statusStepsMustComeInOrder() throws {
        let device = VirtioEchoDevice()
        let g = try VirtioTestGuest(device)
        g.setStatus(VirtioStatus.driver)  // DRIVER without ACKNOWLEDGE
        #expect(g.status == 0)
        g.setStatus(VirtioStatus.acknowledge)
        g.setStatus(VirtioStatus.acknowledge | VirtioStatus.driverOK)  // DRIVER_OK before FEATURES_OK
        #expect(g.status == VirtioStatus.acknowledge)
        g.setStatus(Self.ackDriver)
        g.setStatus(Self.ackDriver | VirtioStatus.driverOK)
        #expect(g.status == Self.ackDriver)
        g.setStatus(VirtioStatus.acknowledge)  // clearing DRIVER
        #expect(g.status == Self.ackDriver)
        g.setStatus(Self.ackDriver | 0x10)  // undefined bit
        #expect(g.status == Self.ackDriver)
        #expect(g.transport.diagnostics.count(of: "invalidStatusTransition") == 5)
        #expect(device.activations.withLock { $0 }.isEmpty)
        // FAILED may be set at any point.
        g.setStatus(Self.ackDriver | VirtioStatus.failed)
        #expect(g.status == Self.ackDriver | VirtioStatus.failed)
    }

    @Test func driverFeaturesAreOnlyTakenDuringNegotiation() throws {
        let g = try VirtioTestGuest(VirtioEchoDevice())
        g.writeDriverFeatures(VirtioFeature.version1)  // before DRIVER
        g.setStatus(VirtioStatus.acknowledge); g.setStatus(Self.ackDriver)
        g.setStatus(Self.allButOK)
        #expect(g.status == Self.ackDriver)  // nothing was accepted, so no VERSION_1
        #expect(g.transport.diagnostics.count(of: "featuresWrittenOutOfOrder") == 2)
        g.reset()
        #expect(g.negotiate(VirtioFeature.version1))
        g.writeDriverFeatures(VirtioFeature.version1 | 1)  // after FEATURES_OK
        #expect(g.transport.negotiatedFeatures == VirtioFeature.version1)
        #expect(g.transport.diagnostics.count(of: "featuresWrittenOutOfOrder") == 4)
    }

    @Test func queueRegistersOnlyBetweenFeaturesOKAndDriverOK() throws {
        let g = try VirtioTestGuest(VirtioEchoDevice())
        // Before FEATURES_OK
        g.setStatus(VirtioStatus.acknowledge); g.setStatus(Self.ackDriver)
        g.setReg(Reg.queueSel, 0)
        g.setReg(Reg.queueNum, 8)
        g.setReg(Reg.queueReady, 1)
        #expect(g.reg(Reg.queueReady) == 0)
        #expect(g.transport.queue(0)?.size == 16)
        #expect(g.transport.diagnostics.count(of: "queueConfigurationNotAllowed") == 2)

        g.reset()
        g.start(queues: 1)
        #expect(g.status == Self.live)
        // After DRIVER_OK: queue 1 cannot be set up any more, queue 0 cannot be moved.
        g.setReg(Reg.queueSel, 1)
        g.setReg(Reg.queueDescLow, 0x40000)
        g.setReg(Reg.queueReady, 1)
        #expect(g.reg(Reg.queueReady) == 0)
        g.setReg(Reg.queueSel, 0)
        g.setReg(Reg.queueDescLow, 0x50000)
        #expect(g.transport.queue(0)?.descriptorTable == 0x10000)
        #expect(g.transport.diagnostics.count(of: "queueConfigurationNotAllowed") == 5)
        #expect(g.status == Self.live)  // ignored, not fatal
    }

    @Test func badQueueSizesAndLayoutsAreRefused() throws {
        let g = try VirtioTestGuest(VirtioEchoDevice())
        #expect(g.negotiate())
        g.setReg(Reg.queueSel, 0)
        for bad: UInt32 in [0, 3, 32, 0xFFFF_FFFF] { g.setReg(Reg.queueNum, bad) }
        #expect(g.transport.diagnostics.count(of: "invalidQueueSize") == 4)
        #expect(g.transport.queue(0)?.size == 16)
        g.setReg(Reg.queueNum, 8)
        g.setReg(Reg.queueDescLow, 0x1008)  // misaligned
        g.setReg(Reg.queueReady, 1)
        #expect(g.reg(Reg.queueReady) == 0)
        g.setReg(Reg.queueDescLow, 0); g.setReg(Reg.queueDescHigh, 1)  // 4 GiB: outside RAM
        g.setReg(Reg.queueReady, 1)
        #expect(g.reg(Reg.queueReady) == 0)
        #expect(g.transport.diagnostics.count(of: "invalidQueueLayout") == 2)
        g.setReg(Reg.queueSel, 7)
        g.setReg(Reg.queueNum, 8)
        g.notify(7)
        #expect(g.transport.diagnostics.count(of: "noSuchQueue") == 2)
        #expect(g.status & VirtioStatus.deviceNeedsReset == 0)
    }

    @Test func usedBuffersRaiseTheInterruptUntilAcknowledged() throws {
        let device = VirtioEchoDevice()
        let g = try VirtioTestGuest(device)
        g.start(queues: 2)
        g.post(0, readable: [[1, 2, 3]])
        g.notify(0)
        #expect(g.takeUsed(0).map(\.id) == [0])
        #expect(g.reg(Reg.interruptStatus) == VirtioInterrupt.usedBuffer)
        #expect(g.recorder.interrupts == [true])
        g.setReg(Reg.interruptACK, 1)
        #expect(g.reg(Reg.interruptStatus) == 0)
        #expect(g.recorder.interrupts == [true, false])
        // With VIRTQ_AVAIL_F_NO_INTERRUPT the device stays quiet.
        try g.memory.store(UInt16(1), at: g.rings[0]!.avail)
        g.post(0, readable: [[4]])
        g.notify(0)
        #expect(g.takeUsed(0).count == 1)
        #expect(g.reg(Reg.interruptStatus) == 0)
    }

    @Test func notificationsBeforeDriverOKWaitForIt() throws {
        let device = VirtioEchoDevice()
        let g = try VirtioTestGuest(device)
        #expect(g.negotiate())
        g.setUpQueue(0)
        g.setUpQueue(1)
        g.post(1, readable: [[1]])
        g.notify(1)
        #expect(g.takeUsed(1).isEmpty)
        g.setStatus(Self.live)
        #expect(g.takeUsed(1).count == 1)
    }

    @Test func writingZeroToStatusResetsTheDevice() throws {
        let device = VirtioEchoDevice()
        let g = try VirtioTestGuest(device)
        g.start(queues: 2)
        g.post(0, readable: [[1]])
        g.notify(0)
        #expect(g.recorder.lineAsserted)
        g.setStatus(0)
        #expect(g.status == 0)
        #expect(g.reg(Reg.interruptStatus) == 0)
        #expect(!g.recorder.lineAsserted)
        #expect(g.transport.negotiatedFeatures == 0)
        #expect(g.transport.queue(0)?.isReady == false)
        #expect(g.transport.queue(0)?.descriptorTable == 0)
        #expect(device.resets.withLock { $0 } == 1)
        // …and can be brought up again.
        g.rings = [:]
        g.start(queues: 2)
        g.post(1, readable: [[2]])
        g.notify(1)
        #expect(g.takeUsed(1).count == 1)
    }

    @Test func configSpaceTakesByteToQuadAccesses() throws {
        let device = VirtioEchoDevice()
        let g = try VirtioTestGuest(device)
        let t = g.transport
        #expect(t.mmioRead(offset: 0x100, size: 1) == 1)
        #expect(t.mmioRead(offset: 0x101, size: 2) == 0x0302)
        #expect(t.mmioRead(offset: 0x104, size: 4) == 0x0807_0605)
        #expect(t.mmioRead(offset: 0x100, size: 8) == 0x0807_0605_0403_0201)
        #expect(t.mmioRead(offset: 0x106, size: 4) == 0)  // runs past the end
        #expect(t.mmioRead(offset: 0x1F0, size: 4) == 0)
        #expect(t.mmioRead(offset: 0x100, size: 3) == 0)
        #expect(t.diagnostics.count(of: "configAccess") == 3)
        t.mmioWrite(offset: 0x104, size: 2, value: 0xBEEF)
        #expect(t.mmioRead(offset: 0x104, size: 4) == 0x0807_BEEF)
        t.mmioWrite(offset: 0x1FF, size: 1, value: 0)
        #expect(t.diagnostics.count(of: "configAccess") == 4)
    }

    @Test func configurationChangeBumpsGenerationAndInterruptsALiveDriver() throws {
        let device = VirtioEchoDevice()
        let g = try VirtioTestGuest(device)
        let handle = try #require(device.transportHandle.withLock { $0.value })
        handle.configurationChanged()
        #expect(g.reg(Reg.configGeneration) == 1)
        #expect(g.reg(Reg.interruptStatus) == 0)  // no driver yet
        g.start(queues: 2)
        handle.configurationChanged()
        #expect(g.reg(Reg.configGeneration) == 2)
        #expect(g.reg(Reg.interruptStatus) == VirtioInterrupt.configurationChange)
        #expect(g.recorder.lineAsserted)
    }

    @Test func ringFaultsSetNeedsResetAndTheDeviceRecovers() throws {
        let device = VirtioEchoDevice()
        let g = try VirtioTestGuest(device)
        g.start(queues: 2)
        // A descriptor loop on queue 0.
        g.writeDescriptor(0, index: 0, address: 0x20_0000, length: 4, flags: VirtqDescriptorFlag.next, next: 1)
        g.writeDescriptor(0, index: 1, address: 0x20_0000, length: 4, flags: VirtqDescriptorFlag.next, next: 0)
        g.publish(0, head: 0)
        g.notify(0)
        #expect(g.status == Self.live | VirtioStatus.deviceNeedsReset)
        #expect(g.reg(Reg.interruptStatus) & VirtioInterrupt.configurationChange != 0)
        #expect(g.recorder.lineAsserted)
        #expect(g.transport.diagnostics.count(of: "descriptorLoop") == 1)
        #expect(g.transport.diagnostics.lastError?.contains("descriptor loop") == true)
        // Further notifications are ignored until reset.
        let before = device.processed.withLock { $0.count }
        g.notify(1)
        #expect(device.processed.withLock { $0.count } == before)
        // Status writes keep DEVICE_NEEDS_RESET visible.
        g.setStatus(Self.live)
        #expect(g.status & VirtioStatus.deviceNeedsReset != 0)
        g.reset()
        #expect(g.status == 0)
        g.start(queues: 2)
        g.post(0, readable: [[9]])
        g.notify(0)
        #expect(g.takeUsed(0).count == 1)
        #expect(g.status == Self.live)
    }
}
