import Devices
import Dispatch
import Testing
import TestSupport
import VirtCore
@testable import VMM

/// S4: SR-IOV virtual functions assigned to VMs, their DMA confined by the IOMMU.
@Suite struct DeviceAssignmentTests {
    enum Victim: String, CaseIterable { case otherVM, vmm }

    /// Runs the attack guest on VF 0 against `victim`'s memory; returns the guest's
    /// output, the platform and the victim's memory with where the target lies in it.
    private func attack(engine: EngineChoice, victim: Victim, iommu: Bool) throws -> (String, DeviceAssignmentPlatform, GuestMemory, UInt64) {
        let platform = try DeviceAssignmentPlatform(virtualFunctions: 2, iommuEnabled: iommu)
        let capture = SerialCapture()
        // The victim VM is placed (and given VF 1) but need not run: its RAM is what matters.
        let other = try bundledMachine("sriov-vf", engine: .software, capture: SerialCapture())
        let target: UInt64, memory: GuestMemory, offset: UInt64
        switch victim {
        case .otherVM:
            memory = other.memory
            offset = 0x40_0000
            // The attacker is VM 0; the victim will be VM 1.
            target = DeviceAssignmentPlatform.hostBase(ofVM: 1) + offset
        case .vmm:
            memory = platform.vmmMemory
            offset = 0x1000
            target = DeviceAssignmentPlatform.vmmBase + offset
        }
        let m = try bundledMachine("sriov-vf", engine: engine, commandLine: "mode=2 target=0x\(String(target, radix: 16))", capture: capture)
        try platform.assign(vf: 0, to: m, name: "attacker")
        try platform.assign(vf: 1, to: other, name: "victim")
        try memory.fill(0x5A, at: offset, count: 4096)
        platform.start()
        defer { platform.stop() }
        let r = try m.run()
        #expect(r.stopReason == .exitPort(status: 0), "\(capture.text)")
        return (capture.text, platform, memory, offset)
    }

    @Test(arguments: TestEngines.available, Victim.allCases)
    func outOfDomainDMAIsBlockedAndLogged(engine: EngineChoice, victim: Victim) throws {
        let (text, platform, memory, offset) = try attack(engine: engine, victim: victim, iommu: true)
        #expect(text.contains("loopback=ok rx-attack=blocked tx-attack=blocked"), "\(text)")
        #expect(text.contains("tx_errors=1 rx_errors=1"), "\(text)")
        #expect(try memory.read(at: offset, count: 4096).allSatisfy { $0 == 0x5A })
        let vf0 = try #require(platform.nic.requester(ofVF: 0))
        let faults = platform.iommu.faultLog.faults
        #expect(faults.map(\.access) == [.write, .read])
        #expect(faults.allSatisfy { $0.requester == vf0 && $0.domain == 1 && $0.reason == .pageNotPresent })
        #expect(Set(faults.map(\.iova)).count == 1)
        let counters = try #require(platform.nic.counters(ofVF: 0))
        #expect(counters.rxDMAErrors == 1 && counters.txDMAErrors == 1 && counters.framesReceived == 1)
    }

    @Test(arguments: Victim.allCases)
    func withTheIOMMUOffTheSameAttackSucceeds(victim: Victim) throws {
        let (text, platform, memory, offset) = try attack(engine: .software, victim: victim, iommu: false)
        #expect(text.contains("loopback=ok rx-attack=written tx-attack=read"), "\(text)")
        #expect(try memory.read(at: offset + 18, count: 8) == Array("PWNED!!!".utf8))
        #expect(platform.iommu.faultLog.faults.isEmpty)
    }

    /// Two sriov-vf guests ping-pong `count` frames through VFs 0 and 1; returns both
    /// runs' results and output.
    private func pingPong(engine: EngineChoice, count: Int, pongOptions: String = "") throws
        -> (ping: RunResult, pong: RunResult?, pingOut: String, pongOut: String, platform: DeviceAssignmentPlatform) {
        let platform = try DeviceAssignmentPlatform(virtualFunctions: 2)
        let pingOut = SerialCapture(), pongOut = SerialCapture()
        let ping = try bundledMachine("sriov-vf", engine: engine, commandLine: "mode=0 peer=1 count=\(count)", capture: pingOut)
        let pong = try bundledMachine("sriov-vf", engine: engine, commandLine: "mode=1 count=\(count) \(pongOptions)", capture: pongOut)
        try platform.assign(vf: 0, to: ping, name: "a", page: .size2M)
        try platform.assign(vf: 1, to: pong, name: "b", page: .size2M)
        platform.start()
        defer { platform.stop() }
        let group = DispatchGroup()
        nonisolated(unsafe) var pongResult: RunResult?  // SAFETY: written by one thread, read after group.wait()
        DispatchQueue.global().async(group: group) { pongResult = try? pong.run() }
        let r = try ping.run()
        group.wait()
        return (r, pongResult, pingOut.text, pongOut.text, platform)
    }

    /// The payload sum both sides report for `count` frames (110 bytes of pattern each).
    private func expectedSum(_ count: Int) -> Int {
        (0..<count).reduce(0) { s, seq in s + (18..<128).reduce(0) { $0 + Int(UInt8(truncatingIfNeeded: seq + $1)) } }
    }

    @Test(arguments: TestEngines.available)
    func virtualFunctionsSwitchFramesBetweenVMs(engine: EngineChoice) throws {
        let (r, pongResult, pingOut, pongOut, platform) = try pingPong(engine: engine, count: 40)
        #expect(r.stopReason == .exitPort(status: 0), "\(pingOut)")
        #expect(pongResult?.stopReason == .exitPort(status: 0), "\(pongOut)")
        // Each driver found its VF on its VM's PCI bus, BAR0 sized, at the register page.
        for text in [pingOut, pongOut] {
            #expect(text.contains("sriov-vf: VF at 00:01.0, BAR0 0x5e000 (4 KiB)"), "\(text)")
        }
        #expect(pingOut.contains("ping count=40 sum=\(expectedSum(40)): ok"), "\(pingOut)")
        #expect(pongOut.contains("pong count=40 sum=\(expectedSum(40)): ok"), "\(pongOut)")
        #expect(platform.iommu.faultLog.faults.isEmpty)
        #expect(try #require(platform.nic.counters(ofVF: 1)).framesReceived >= 40)
        // The fast path never exits: registers are RAM; only configuration ports, the
        // console and the exit port trap.
        #expect(r.statistics[.mmio].count == 0 && pongResult?.statistics[.mmio].count == 0)
    }

    @Test(arguments: TestEngines.available)
    func pongSleepsUntilTheReceiveInterrupt(engine: EngineChoice) throws {
        let (r, pongResult, pingOut, pongOut, _) = try pingPong(engine: engine, count: 20, pongOptions: "irq=1")
        #expect(r.stopReason == .exitPort(status: 0), "\(pingOut)")
        #expect(pongResult?.stopReason == .exitPort(status: 0), "\(pongOut)")
        #expect(pongOut.contains("pong count=20 sum=\(expectedSum(20)): ok"), "\(pongOut)")
        let taken = pongOut.split(separator: "\n").first { $0.hasPrefix("sriov-vf: receive interrupts taken: ") }
            .flatMap { UInt64($0.split(separator: " ").last ?? "") }
        #expect((taken ?? 0) > 0, "\(pongOut)")
        // Programming MSI-X traps (BAR2 is MMIO); the receive path still does not.
        #expect((pongResult?.statistics[.mmio].count ?? 0) > 0)
    }
}

/// A partition's virtio devices confined in the partition's own IOMMU domain.
@Suite struct PartitionDeviceConfinementTests {
    @Test(arguments: TestEngines.available)
    func confinedDiskWorksAndItsDomainRefusesDMAOutsideTheVM(engine: EngineChoice) throws {
        let disk = try TemporaryDisk(sectors: 64, sector0: "boot sector of a test image\n")
        let capture = SerialCapture()
        let m = try bundledMachine("disk", engine: engine, commandLine: "irq=1", capture: capture)
        try m.addVirtioBlock(path: disk.path)
        let platform = try DeviceAssignmentPlatform(virtualFunctions: 0)
        let functions = try platform.confineVirtioDevices(of: m, name: "critical")
        #expect(functions == [RequesterID(bus: 0x10, device: 0, function: 0)])
        #expect(platform.iommu.domain(of: functions[0]) == DeviceAssignmentPlatform.partitionDomain(ofVM: 0))
        let r = try m.run()
        #expect(r.stopReason == .exitPort(status: 0), "\(capture.text)")
        #expect(capture.text.contains("disk: sector 0: boot sector of a test image"))
        #expect(platform.iommu.counters.translations > 0)
        #expect(platform.iommu.faultLog.faults.isEmpty)
        // The device's DMA one page past its VM's RAM (where another VM or the VMM would
        // be reachable without the IOMMU) is refused and logged.
        let dma = DeviceDMA(requester: functions[0], iommu: platform.iommu, space: platform.space)
        #expect(throws: DMAError.self) { try dma.read(at: m.memory.size, count: 64) }
        let fault = try #require(platform.iommu.faultLog.faults.last)
        #expect(fault.requester == functions[0] && fault.iova == m.memory.size && fault.reason == .pageNotPresent)
    }
}

/// virtio's real device path behind the IOMMU: the disk guest runs unchanged while every
/// buffer the device touches is translated in its own domain.
@Suite struct ConfinedVirtioTests {
    @Test(arguments: TestEngines.available)
    func diskGuestRunsWithItsDeviceConfinedToItsDomain(engine: EngineChoice) throws {
        let disk = try TemporaryDisk(sectors: 64, sector0: "boot sector of a test image\n")
        let capture = SerialCapture()
        let m = try bundledMachine("disk", engine: engine, commandLine: "irq=1", capture: capture)
        let transport = try m.addVirtioBlock(path: disk.path)
        let platform = try DeviceAssignmentPlatform(virtualFunctions: 0)
        let function = RequesterID(bus: 0, device: 4, function: 0)
        try platform.confine(transport, of: m, name: "disk-vm", as: function, domain: 9)
        let r = try m.run()
        #expect(r.stopReason == .exitPort(status: 0), "\(capture.text)")
        #expect(capture.text.contains("disk: sector 0: boot sector of a test image"))
        let expected = Array("written by the disk guest through virtio-blk\n".utf8)
        #expect(try Array(disk.sector(1).prefix(expected.count)) == expected)
        #expect(platform.iommu.counters.translations > 0)
        #expect(platform.iommu.faultLog.faults.isEmpty)
        #expect(!transport.needsReset)
    }
}

