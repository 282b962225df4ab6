import Testing
import VirtCore
@testable import Devices

/// A virtio-pci function saved as a snapshot saves it (configuration space from the bridge,
/// the transport's state, the device's) and restored into a fresh bridge and transport: the
/// driver finds its BARs where it moved them, its queues, vectors and pending MSI-X message,
/// and the device goes on from the same ring indices.
@Suite struct VirtioPCISnapshotTests {
    /// A console driven to DRIVER_OK with its BARs moved by the guest, one buffer consumed,
    /// then a second one sent while queue 1's vector was masked (its message pending).
    private func drivenConsole(_ output: VirtioRecorder) throws -> VirtioPCITestDriver {
        let driver = try VirtioPCITestDriver(VirtioConsole(output: output.sink))
        try driver.placeBARs()
        // The guest moves both BARs higher in the window, as an OS reassigning them would.
        let moved = driver.bridge.barWindow.lowerBound + 0x10_0000
        driver.setConfig(PCIConfigSpace.bar0, UInt32(moved))
        driver.setConfig(PCIConfigSpace.bar0 + 4, UInt32(moved + 0x4000))
        driver.setConfig(PCIConfigSpace.interruptLine, size: 1, 11)
        try driver.placeBARs()
        #expect(driver.bar0 == moved)
        driver.enableMSIX()
        #expect(driver.negotiate())
        driver.write(VirtioPCITransport.Common.configMSIXVector, 2, 2)
        driver.setUpQueue(0, vector: 0)
        driver.setUpQueue(1, size: 16, vector: 1)
        driver.setStatus(VirtioStatus.acknowledge | VirtioStatus.driver | VirtioStatus.featuresOK | VirtioStatus.driverOK)
        try driver.postReadable(1, Array("before".utf8), size: 16)
        driver.notify(1)
        let entry1 = driver.bar1 - VirtioPCITestDriver.ecam + 16
        driver.bridge.mmioWrite(offset: entry1 + 12, size: 4, value: 1)  // mask vector 1
        try driver.postReadable(1, Array("masked".utf8), size: 16)
        try driver.memory.store(UInt16(2), at: 0x20000 + 16 * 16 + 2)
        try driver.memory.store(UInt16(0), at: 0x20000 + 16 * 16 + 4 + 2)
        driver.notify(1)
        #expect(output.text == "beforemasked")
        #expect(driver.messages.all == [MSIX.Message(address: 0xFEE0_0000, data: 0x41)])
        return driver
    }

    /// The saved pieces: configuration bytes, transport state, device state.
    private func save(_ driver: VirtioPCITestDriver) throws -> ([UInt8], VirtioPCITransport.SavedState, [UInt8]) {
        driver.transport.freeze()
        defer { driver.transport.thaw() }
        let config = try #require(driver.bridge.config(of: VirtioPCITestDriver.slot))
        return (config.savedBytes, driver.transport.savedState, driver.transport.device.savedDeviceState())
    }

    @Test func aRestoredFunctionAnswersAtTheGuestsBARsWithItsQueuesVectorsAndPendingMessage() throws {
        let source = try drivenConsole(VirtioRecorder())
        let (config, saved, device) = try save(source)

        // The destination: the same RAM, a fresh bridge, transport and device.
        let memory = try GuestMemory(size: source.memory.size)
        try memory.write(try source.memory.read(at: 0, count: Int(source.memory.size)), at: 0)
        let output = VirtioRecorder()
        let restored = try VirtioPCITestDriver(VirtioConsole(output: output.sink), memory: memory)
        try restored.transport.device.restoreDeviceState(device)
        try restored.bridge.restoreConfig(of: VirtioPCITestDriver.slot, savedBytes: config)
        try restored.transport.restore(saved, config: try #require(restored.bridge.config(of: VirtioPCITestDriver.slot)))
        #expect(restored.bridge.config(of: VirtioPCITestDriver.slot)?.savedBytes == config)
        #expect(restored.transport.savedState == saved)

        // Firmware placement leaves the guest's BARs alone; they decode where the guest put them.
        try restored.placeBARs()
        #expect(restored.bar0 == source.bar0 && restored.bar1 == source.bar1)
        #expect(restored.config(PCIConfigSpace.interruptLine, size: 1) == 11)
        let all = VirtioStatus.acknowledge | VirtioStatus.driver | VirtioStatus.featuresOK | VirtioStatus.driverOK
        #expect(restored.status == all)
        #expect(restored.read(VirtioPCITransport.Common.configMSIXVector, 2) == 2)
        restored.write(VirtioPCITransport.Common.queueSelect, 2, 1)
        #expect(restored.read(VirtioPCITransport.Common.queueSize, 2) == 16)
        #expect(restored.read(VirtioPCITransport.Common.queueMSIXVector, 2) == 1)
        #expect(restored.read(VirtioPCITransport.Common.queueEnable, 2) == 1)
        #expect(restored.read(VirtioPCITransport.Common.queueDesc, 8) == 0x20000)
        // The message raised while masked is still pending: unmasking sends it here.
        #expect(restored.bridge.mmioRead(offset: restored.bar1 - VirtioPCITestDriver.ecam + MSIX.pbaOffset, size: 8) == 0b10)
        restored.bridge.mmioWrite(offset: restored.bar1 - VirtioPCITestDriver.ecam + 16 + 12, size: 4, value: 0)
        #expect(restored.messages.all == [MSIX.Message(address: 0xFEE0_0000, data: 0x41)])

        // The device goes on from the saved ring indices: the third buffer, not the first again.
        try restored.postReadable(1, Array("after".utf8), size: 16)
        try memory.store(UInt16(3), at: 0x20000 + 16 * 16 + 2)
        try memory.store(UInt16(0), at: 0x20000 + 16 * 16 + 4 + 4)
        restored.notify(1)
        #expect(output.text == "after")
        #expect(try restored.usedIndex(1) == 3)
        #expect(restored.messages.all.count == 2)
    }

    @Test func aRecordForAnotherDeviceOrOutOfRangeIsRefusedAndChangesNothing() throws {
        let source = try drivenConsole(VirtioRecorder())
        let (config, saved, _) = try save(source)
        let fresh = try VirtioPCITestDriver(VirtioConsole(output: { _ in }))
        let before = try #require(fresh.bridge.config(of: VirtioPCITestDriver.slot))
        let stateBefore = fresh.transport.savedState

        // Configuration space of another device (its device ID differs): read-only bytes differ.
        var foreign = config
        foreign[PCIConfigSpace.deviceID] ^= 1
        #expect(throws: DeviceStateError.self) { try fresh.bridge.restoreConfig(of: VirtioPCITestDriver.slot, savedBytes: foreign) }
        #expect(throws: DeviceStateError.self) { try fresh.bridge.restoreConfig(of: VirtioPCITestDriver.slot, savedBytes: Array(config.prefix(256))) }
        #expect(throws: DeviceStateError.self) { try fresh.bridge.restoreConfig(of: RequesterID(bus: 0, device: 9, function: 0), savedBytes: config) }
        #expect(fresh.bridge.config(of: VirtioPCITestDriver.slot) == before)

        // Transport records that do not fit a console's two queues and three vectors.
        var vectorBeyond = saved
        vectorBeyond.queueVectors[0] = 3
        var queues = saved
        queues.queueVectors.append(VirtioPCITransport.noVector)
        var table = saved
        table.msix.table.removeLast(4)
        var ring = saved
        ring.function.queues[1].size = 4096
        for bad in [vectorBeyond, queues, table, ring] {
            #expect(throws: (any Error).self) { try fresh.transport.restore(bad, config: before) }
            #expect(fresh.transport.savedState == stateBefore)
        }
        #expect(fresh.transport.status == 0)
    }
}
