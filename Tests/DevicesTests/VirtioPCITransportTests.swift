import Synchronization
import Testing
import VirtCore
@testable import Devices

/// Plays a virtio-pci driver (as Linux's virtio_pci_modern does it) against a
/// `VirtioPCITransport` behind a `PCIHostBridge`: configuration space through mechanism #1
/// and ECAM, the structures and the MSI-X table through the BARs the bridge placed.
final class VirtioPCITestDriver {
    static let ecam: UInt64 = 0xE000_0000
    static let slot = RequesterID(bus: 0, device: 1, function: 0)

    let memory: GuestMemory
    let bridge: PCIHostBridge
    let transport: VirtioPCITransport
    let messages = MessageLog()
    let recorder = VirtioRecorder()
    private(set) var bar0: UInt64 = 0
    private(set) var bar1: UInt64 = 0

    /// `memory`: the guest RAM to use (default: 4 MiB of fresh RAM).
    init(_ device: any VirtioDevice, memory: GuestMemory? = nil) throws {
        self.memory = try memory ?? GuestMemory(size: 4 << 20)
        bridge = PCIHostBridge(mmioBase: Self.ecam, buses: 1)
        let host = PCIHostBridgeFunction()
        try bridge.attach(host, at: RequesterID(bus: 0, device: 0, function: 0), config: host.configuration)
        let messages = messages
        transport = try VirtioPCITransport(device: device, memory: self.memory, deliver: { messages.append($0) }, log: recorder.log)
        try bridge.attach(transport, at: Self.slot, config: transport.configuration)
    }

    // MARK: configuration space (ECAM)

    func config(_ offset: Int, size: UInt8 = 4) -> UInt32 {
        UInt32(truncatingIfNeeded: bridge.mmioRead(offset: UInt64(Self.slot.device) << 15 | UInt64(offset), size: size))
    }
    func setConfig(_ offset: Int, size: UInt8 = 4, _ value: UInt32) {
        bridge.mmioWrite(offset: UInt64(Self.slot.device) << 15 | UInt64(offset), size: size, value: UInt64(value))
    }

    /// Firmware placement, then the BAR addresses as the driver reads them.
    func placeBARs() throws {
        try bridge.assignBARs()
        bar0 = UInt64(config(PCIConfigSpace.bar0) & 0xFFFF_FFF0)
        bar1 = UInt64(config(PCIConfigSpace.bar0 + 4) & 0xFFFF_FFF0)
    }

    /// The vendor-specific capabilities: cfg_type → (bar, offset, length).
    func virtioCapabilities() -> [UInt8: (bar: UInt8, offset: UInt32, length: UInt32)] {
        var found: [UInt8: (UInt8, UInt32, UInt32)] = [:]
        var at = Int(config(PCIConfigSpace.capabilitiesPointer, size: 1))
        while at != 0 {
            if config(at, size: 1) == 0x09 {
                found[UInt8(config(at + 3, size: 1))] = (UInt8(config(at + 4, size: 1)), config(at + 8), config(at + 12))
            }
            at = Int(config(at + 1, size: 1))
        }
        return found
    }

    // MARK: BAR access

    func read(_ offset: UInt64, _ size: UInt8) -> UInt64 { bridge.mmioRead(offset: bar0 + offset - Self.ecam, size: size) }
    func write(_ offset: UInt64, _ size: UInt8, _ value: UInt64) { bridge.mmioWrite(offset: bar0 + offset - Self.ecam, size: size, value: value) }
    typealias C = VirtioPCITransport.Common

    var status: UInt8 { UInt8(read(C.deviceStatus, 1)) }
    func setStatus(_ s: UInt8) { write(C.deviceStatus, 1, UInt64(s)) }

    func offeredFeatures() -> UInt64 {
        write(C.deviceFeatureSelect, 4, 0)
        let low = read(C.deviceFeature, 4)
        write(C.deviceFeatureSelect, 4, 1)
        return read(C.deviceFeature, 4) << 32 | low
    }

    func negotiate() -> Bool {
        setStatus(VirtioStatus.acknowledge)
        setStatus(VirtioStatus.acknowledge | VirtioStatus.driver)
        let features = offeredFeatures()
        write(C.driverFeatureSelect, 4, 0)
        write(C.driverFeature, 4, features & 0xFFFF_FFFF)
        write(C.driverFeatureSelect, 4, 1)
        write(C.driverFeature, 4, features >> 32)
        setStatus(VirtioStatus.acknowledge | VirtioStatus.driver | VirtioStatus.featuresOK)
        return status & VirtioStatus.featuresOK != 0
    }

    /// MSI-X on, vector v's message: address 0xFEE00000, data 0x40 + v, unmasked.
    func enableMSIX() {
        let cap = transport.configuration.findCapability(MSIX.capabilityID)!
        setConfig(cap + 2, size: 2, UInt32(MSIX.enableBit))
        for v in 0..<3 {
            let entry = bar1 - Self.ecam + UInt64(16 * v)
            bridge.mmioWrite(offset: entry, size: 4, value: 0xFEE0_0000)
            bridge.mmioWrite(offset: entry + 4, size: 4, value: 0)
            bridge.mmioWrite(offset: entry + 8, size: 4, value: UInt64(0x40 + v))
            bridge.mmioWrite(offset: entry + 12, size: 4, value: 0)
        }
    }

    /// Queue `q` at 0x10000·(q+1), size `size` (default: what queue_size offers), vector `vector`.
    func setUpQueue(_ q: UInt16, size: UInt16? = nil, vector: UInt16) {
        write(C.queueSelect, 2, UInt64(q))
        let n = size ?? UInt16(read(C.queueSize, 2))
        write(C.queueSize, 2, UInt64(n))
        write(C.queueMSIXVector, 2, UInt64(vector))
        let base = 0x10000 * UInt64(q + 1)
        try? memory.fill(0, at: base, count: 0x10000)
        write(C.queueDesc, 4, base); write(C.queueDesc + 4, 4, 0)
        write(C.queueDriver, 4, base + 16 * UInt64(n)); write(C.queueDriver + 4, 4, 0)
        write(C.queueDevice, 4, base + 0x8000); write(C.queueDevice + 4, 4, 0)
        write(C.queueEnable, 2, 1)
    }

    func notify(_ q: UInt16) {
        write(C.queueSelect, 2, UInt64(q))
        let off = read(C.queueNotifyOff, 2)
        write(VirtioPCITransport.notifyOffset + off * VirtioPCITransport.notifyMultiplier, 2, UInt64(q))
    }

    /// One descriptor with `bytes` (device-readable) at 0x200000 in queue `q`, published.
    func postReadable(_ q: UInt16, _ bytes: [UInt8], size: UInt16, flags: UInt16 = 0, next: UInt16 = 0) throws {
        let base = 0x10000 * UInt64(q + 1)
        try memory.write(bytes, at: 0x20_0000)
        try memory.store(UInt64(0x20_0000), at: base)
        try memory.store(UInt32(bytes.count), at: base + 8)
        try memory.store(flags, at: base + 12)
        try memory.store(next, at: base + 14)
        let avail = base + 16 * UInt64(size)
        try memory.store(UInt16(0), at: avail + 4)
        try memory.store(UInt16(1), at: avail + 2)
    }

    func usedIndex(_ q: UInt16) throws -> UInt16 { try memory.load(at: 0x10000 * UInt64(q + 1) + 0x8000 + 2) }
}

@Suite struct VirtioPCITransportTests {
    @Test func configurationSpaceIdentifiesAModernVirtioDeviceWithItsStructures() throws {
        let driver = try VirtioPCITestDriver(VirtioConsole(output: { _ in }))
        #expect(driver.config(0) == 0x1043_1AF4)  // 0x1040 + console (3)
        #expect(driver.config(0x08) >> 8 == 0x07_8000 && driver.config(0x08) & 0xFF == 1)  // class, revision 1
        #expect(driver.config(PCIConfigSpace.interruptLine + 1, size: 1) == 0)  // no INTx pin
        let caps = driver.virtioCapabilities()
        #expect(caps[1]?.bar == 0 && caps[1]?.offset == 0 && caps[1]?.length == 0x40)        // COMMON_CFG
        #expect(caps[3]?.offset == 0x1000)                                                     // ISR_CFG
        #expect(caps[4]?.offset == 0x2000 && caps[4]?.length == UInt32(VirtioConsole(output: { _ in }).configSpace().count))  // DEVICE_CFG
        #expect(caps[2]?.offset == 0x3000)                                                     // NOTIFY_CFG
        let msix = try #require(driver.transport.configuration.findCapability(MSIX.capabilityID))
        #expect(driver.config(msix + 2, size: 2) & 0x7FF == 2)  // 3 vectors: two queues and configuration
        // The host bridge answers at 00:00.0, through the ports at every access size.
        driver.bridge.portWrite(offset: 0, size: 4, value: 0x8000_0008)
        #expect(driver.bridge.portRead(offset: 4, size: 4) >> 8 == PCIHostBridgeFunction.classCode)
        driver.bridge.portWrite(offset: 0, size: 4, value: 0x8000_0000)
        #expect(driver.bridge.portRead(offset: 4, size: 1) == 0x86)
        #expect(driver.bridge.portRead(offset: 5, size: 1) == 0x80)
        #expect(driver.bridge.portRead(offset: 6, size: 2) == UInt32(PCIHostBridgeFunction.deviceID))
    }

    @Test func barsAreSizedWithAllOnesAndPlacedAlignedInTheWindow() throws {
        let driver = try VirtioPCITestDriver(VirtioConsole(output: { _ in }))
        driver.setConfig(PCIConfigSpace.bar0, 0xFFFF_FFFF)
        #expect(driver.config(PCIConfigSpace.bar0) == 0xFFFF_C000)  // 16 KiB of structures
        driver.setConfig(PCIConfigSpace.bar0 + 4, 0xFFFF_FFFF)
        #expect(driver.config(PCIConfigSpace.bar0 + 4) == 0xFFFF_F000)  // 4 KiB MSI-X
        #expect(driver.config(PCIConfigSpace.bar0 + 8) == 0)  // BAR 2 not implemented
        driver.setConfig(PCIConfigSpace.bar0, 0)
        driver.setConfig(PCIConfigSpace.bar0 + 4, 0)
        try driver.placeBARs()
        let window = driver.bridge.barWindow
        #expect(window.contains(driver.bar0) && driver.bar0 % 0x4000 == 0)
        #expect(window.contains(driver.bar1) && driver.bar1 % 0x1000 == 0 && driver.bar1 >= driver.bar0 + 0x4000)
        #expect(UInt16(driver.config(PCIConfigSpace.command, size: 2)) & PCIConfigSpace.memorySpaceEnable != 0)
        #expect(driver.read(VirtioPCITransport.Common.numQueues, 2) == 2)
    }

    @Test func devicesAttachedOneByOneGetDisjointBARs() throws {
        let driver = try VirtioPCITestDriver(VirtioConsole(output: { _ in }))
        try driver.placeBARs()
        let memory = try GuestMemory(size: 1 << 20)
        let second = try VirtioPCITransport(device: VirtioConsole(output: { _ in }), memory: memory, deliver: nil)
        try driver.bridge.attach(second, at: RequesterID(bus: 0, device: 2, function: 0), config: second.configuration)
        try driver.bridge.assignBARs()  // as the platform does after each attach
        let config = try #require(driver.bridge.config(of: RequesterID(bus: 0, device: 2, function: 0)))
        let placed = [driver.bar0, driver.bar1, UInt64(config.read32(PCIConfigSpace.bar0) & ~0xF), UInt64(config.read32(PCIConfigSpace.bar0 + 4) & ~0xF)]
        let ranges = zip(placed, [0x4000, 0x1000, 0x4000, 0x1000] as [UInt64]).map { $0..<($0 + $1) }
        for (i, a) in ranges.enumerated() {
            for b in ranges[(i + 1)...] { #expect(!a.overlaps(b), "\(a) overlaps \(b)") }
        }
        #expect(driver.bar0 == driver.bridge.barWindow.lowerBound)
    }

    @Test func aDriverNegotiatesSetsUpQueuesAndGetsPerQueueMSIXMessages() throws {
        let output = VirtioRecorder()
        let driver = try VirtioPCITestDriver(VirtioConsole(output: output.sink))
        try driver.placeBARs()
        driver.enableMSIX()
        #expect(driver.negotiate())
        write(driver, config: 2)
        driver.setUpQueue(0, vector: 0)
        driver.setUpQueue(1, size: 16, vector: 1)
        driver.write(VirtioPCITransport.Common.queueSelect, 2, 1)
        #expect(driver.read(VirtioPCITransport.Common.queueSize, 2) == 16)
        #expect(driver.read(VirtioPCITransport.Common.queueMSIXVector, 2) == 1)
        #expect(driver.read(VirtioPCITransport.Common.queueEnable, 2) == 1)
        #expect(driver.read(VirtioPCITransport.Common.queueDesc, 8) == 0x20000)
        driver.setStatus(VirtioStatus.acknowledge | VirtioStatus.driver | VirtioStatus.featuresOK | VirtioStatus.driverOK)
        #expect(driver.status & VirtioStatus.driverOK != 0)

        try driver.postReadable(1, Array("hello over pci".utf8), size: 16)
        driver.notify(1)
        #expect(output.text == "hello over pci")
        #expect(try driver.usedIndex(1) == 1)
        #expect(driver.messages.all == [MSIX.Message(address: 0xFEE0_0000, data: 0x41)])  // queue 1's vector

        // Masked, the message waits in the PBA and goes when the vector is unmasked.
        let entry1 = driver.bar1 - VirtioPCITestDriver.ecam + 16
        driver.bridge.mmioWrite(offset: entry1 + 12, size: 4, value: 1)
        try driver.postReadable(1, Array("x".utf8), size: 16)
        try driver.memory.store(UInt16(2), at: 0x20000 + 16 * 16 + 2)
        try driver.memory.store(UInt16(0), at: 0x20000 + 16 * 16 + 4 + 2)
        driver.notify(1)
        #expect(driver.messages.all.count == 1)
        #expect(driver.bridge.mmioRead(offset: driver.bar1 - VirtioPCITestDriver.ecam + MSIX.pbaOffset, size: 8) == 0b10)
        driver.bridge.mmioWrite(offset: entry1 + 12, size: 4, value: 0)
        #expect(driver.messages.all.count == 2)
        // The ISR recorded both, and reading it clears it.
        #expect(driver.read(VirtioPCITransport.isrOffset, 1) == 1)
        #expect(driver.read(VirtioPCITransport.isrOffset, 1) == 0)
        // Reset: status 0, vectors back to NO_VECTOR.
        driver.setStatus(0)
        #expect(driver.status == 0)
        #expect(driver.read(VirtioPCITransport.Common.configMSIXVector, 2) == 0xFFFF)
    }

    private func write(_ driver: VirtioPCITestDriver, config vector: UInt16) {
        driver.write(VirtioPCITransport.Common.configMSIXVector, 2, UInt64(vector))
        #expect(driver.read(VirtioPCITransport.Common.configMSIXVector, 2) == UInt64(vector))
    }

    @Test func aHostileDriverGetsDiagnosticsAndTheDeviceStaysConsistent() throws {
        let driver = try VirtioPCITestDriver(VirtioConsole(output: { _ in }))
        try driver.placeBARs()
        driver.enableMSIX()
        typealias C = VirtioPCITransport.Common
        // Unaligned and wrong-width accesses to the common configuration are ignored.
        driver.write(C.deviceStatus + 1, 2, 0xFFFF)
        driver.write(C.deviceFeatureSelect, 2, 1)
        #expect(driver.read(C.deviceFeatureSelect, 4) == 0)
        #expect(driver.read(C.numQueues, 4) == 0)
        // Read-only fields stay.
        driver.write(C.numQueues, 2, 9)
        #expect(driver.read(C.numQueues, 2) == 2)
        // Beyond every structure, and the notify area for a queue that does not exist.
        #expect(driver.read(0x3F00, 4) == 0)
        driver.write(VirtioPCITransport.notifyOffset + 4 * 40, 2, 40)
        #expect(driver.negotiate())
        // A queue size that is no power of two, or too large, is refused; queue_size keeps its value.
        driver.write(C.queueSelect, 2, 0)
        driver.write(C.queueSize, 2, 100)
        driver.write(C.queueSize, 2, 4096)
        #expect(driver.read(C.queueSize, 2) == 256)
        // A vector beyond the table reads back NO_VECTOR (Linux then falls back).
        driver.write(C.queueMSIXVector, 2, 7)
        #expect(driver.read(C.queueMSIXVector, 2) == 0xFFFF)
        // A queue that does not exist reads size 0.
        driver.write(C.queueSelect, 2, 5)
        #expect(driver.read(C.queueSize, 2) == 0)
        // A broken chain (next beyond the ring) puts the device in DEVICE_NEEDS_RESET and
        // raises the configuration vector.
        write(driver, config: 2)
        driver.setUpQueue(1, size: 16, vector: 1)
        driver.setStatus(VirtioStatus.acknowledge | VirtioStatus.driver | VirtioStatus.featuresOK | VirtioStatus.driverOK)
        try driver.postReadable(1, [1, 2, 3], size: 16, flags: VirtqDescriptorFlag.next, next: 99)
        driver.notify(1)
        #expect(driver.status & VirtioStatus.deviceNeedsReset != 0)
        #expect(driver.messages.all.contains(MSIX.Message(address: 0xFEE0_0000, data: 0x42)))
        #expect(driver.transport.diagnostics.count(of: "pciAccessSize") >= 2)
        #expect(driver.transport.diagnostics.count(of: "pciWriteToReadOnly") == 1)
        #expect(driver.transport.diagnostics.count(of: "pciOutsideStructures") == 1)
        #expect(driver.transport.diagnostics.count(of: "pciNotifyNoSuchQueue") == 1)
        #expect(driver.transport.diagnostics.count(of: "invalidQueueSize") == 2)
        #expect(driver.transport.diagnostics.count(of: "msixVectorOutOfRange") == 1)
        // The driver recovers with a reset.
        driver.setStatus(0)
        #expect(driver.status == 0)
    }

    @Test func theSameDeviceModelRunsBehindEitherTransport() throws {
        // The console echoes the same bytes whichever transport carries them: the protocol
        // (status, features, queues) is the shared VirtioFunction.
        let viaPCI = VirtioRecorder(), viaMMIO = VirtioRecorder()
        let pci = try VirtioPCITestDriver(VirtioConsole(output: viaPCI.sink))
        try pci.placeBARs()
        #expect(pci.negotiate())
        pci.setUpQueue(1, size: 16, vector: 0xFFFF)
        pci.setStatus(VirtioStatus.acknowledge | VirtioStatus.driver | VirtioStatus.featuresOK | VirtioStatus.driverOK)
        try pci.postReadable(1, Array("same".utf8), size: 16)
        pci.notify(1)
        let mmio = try VirtioTestGuest(VirtioConsole(output: viaMMIO.sink))
        mmio.start(queues: 2)
        mmio.post(1, readable: [Array("same".utf8)])
        mmio.notify(1)
        #expect(viaPCI.text == "same" && viaMMIO.text == "same")
        #expect(pci.messages.all.isEmpty)  // NO_VECTOR: no message
    }
}
