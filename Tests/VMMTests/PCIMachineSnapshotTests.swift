import Devices
import Foundation
import Testing
import TestSupport
import VirtCore
@testable import VMM

/// A PC platform machine's virtio-pci devices in the device records a snapshot and a
/// migration carry: a machine built from them has the same devices in the same slots with
/// the configuration space the guest programmed, and a record that is corrupt, foreign or
/// from a newer build is a `MachineSnapshotError.badDeviceState`, never a crash.
@Suite struct PCIMachineSnapshotTests {
    private static let slot = RequesterID(bus: 0, device: 1, function: 0)

    /// A PC platform machine (not run) on the software engine.
    private func pcMachine() throws -> Machine {
        let config = MachineConfiguration(memorySize: 32 << 20, commandLine: "", timeoutSeconds: 10)
        return try Machine(configuration: config, engine: try TestEngines.make(.software), serialOutput: { _ in }) { _ in [VCPUState()] }
    }

    /// A machine with a virtio-pci disk and console whose configuration space a guest has
    /// written (interrupt line, the disk's BAR 0 moved), and its device records.
    private func savedMachine(disk: String) throws -> (Machine, [(name: String, state: [UInt8])]) {
        let m = try pcMachine()
        try PCPlatform.install(on: m, linux: true, cpu: PCCPUFeatures(), hypercallTarget: nil)
        try m.addVirtioPCIBlock(path: disk)
        try m.addVirtioPCIConsole { _ in }
        let bridge = try #require(m.pcPCI?.bridge)
        let ecam = UInt64(Self.slot.device) << 15
        bridge.mmioWrite(offset: ecam + UInt64(PCIConfigSpace.interruptLine), size: 1, value: 10)
        bridge.mmioWrite(offset: ecam + UInt64(PCIConfigSpace.bar0), size: 4, value: bridge.barWindow.lowerBound + 0x20_0000)
        try m.checkDevicesSavable()
        return (m, try m.savedDeviceStates())
    }

    private func diskImage() throws -> String {
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("pci-snapshot-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).img").path
        try Data(count: 1 << 20).write(to: URL(fileURLWithPath: path))
        return path
    }

    @Test func virtioPCIDevicesComeBackInTheirSlotsWithTheGuestsConfiguration() throws {
        let disk = try diskImage()
        defer { try? FileManager.default.removeItem(atPath: disk) }
        var records: [(name: String, state: [UInt8])] = []
        var savedConfig: PCIConfigSpace?
        do {
            let (source, saved) = try savedMachine(disk: disk)
            records = saved
            savedConfig = source.pcPCI?.bridge.config(of: Self.slot)
        }  // the source goes away and unlocks the disk
        #expect(records.map(\.name).contains(Machine.pciManifestName))
        let restored = try pcMachine()
        try restored.restoreDevices(from: records, console: { _ in })
        let pci = try #require(restored.pcPCI)
        #expect(pci.virtioTransports.map(\.name) == ["virtio-blk@00:01.0", "virtio-console@00:02.0"])
        let config = try #require(pci.bridge.config(of: Self.slot))
        #expect(config == savedConfig)
        #expect(config.read8(PCIConfigSpace.interruptLine) == 10)
        #expect(config.barAddress(0) == pci.bridge.barWindow.lowerBound + 0x20_0000)
        // The restored machine saves the same records again (the recipe path included).
        let again = try restored.savedDeviceStates().filter { $0.name.hasPrefix("pci") }
        #expect(again.map(\.name) == records.filter { $0.name.hasPrefix("pci") }.map(\.name))
        for (record, first) in zip(again, records.filter({ $0.name.hasPrefix("pci") })) {
            if record.name == Machine.pciManifestName {
                #expect(try JSONDecoder().decode([DeviceRecipe].self, from: Data(record.state)) == JSONDecoder().decode([DeviceRecipe].self, from: Data(first.state)))
            } else if record.name.hasSuffix(".device") {
                #expect(record.state == first.state, "\(record.name)")
            } else {
                #expect(try JSONDecoder().decode(SavedPCIFunction.self, from: Data(record.state)) == JSONDecoder().decode(SavedPCIFunction.self, from: Data(first.state)))
            }
        }
    }

    @Test func corruptForeignOrNewerRecordsAreRefusedWithTheTypedError() throws {
        let disk = try diskImage()
        defer { try? FileManager.default.removeItem(atPath: disk) }
        var records: [(name: String, state: [UInt8])] = []
        do { records = try savedMachine(disk: disk).1 }
        let original = try JSONDecoder().decode(SavedPCIFunction.self, from: Data(try #require(records.first { $0.name == "pci0" }).state))

        func replacing(_ name: String, with state: [UInt8]) -> [(name: String, state: [UInt8])] {
            records.map { $0.name == name ? (name, state) : $0 }
        }
        func encoded(_ change: (inout SavedPCIFunction) -> Void) throws -> [UInt8] {
            var r = original
            change(&r)
            return Array(try JSONEncoder().encode(r))
        }
        let cases: [(String, [(name: String, state: [UInt8])])] = [
            ("garbage", replacing("pci0", with: Array("{\"version\":".utf8))),
            ("manifest", replacing(Machine.pciManifestName, with: [0xFF, 0x00])),
            ("newer", replacing("pci0", with: try encoded { $0.version = SavedPCIFunction.currentVersion + 1 })),
            ("foreign", replacing("pci0", with: try encoded { $0.config[PCIConfigSpace.vendorID] ^= 0xFF })),
            ("slot", replacing("pci0", with: try encoded { $0.slot = 7 })),
            ("queues", replacing("pci0", with: try encoded { $0.transport.queueVectors.removeLast() })),
            ("missing", records.filter { $0.name != "pci1" }),
        ]
        for (label, bad) in cases {
            let m = try pcMachine()
            do {
                try m.restoreDevices(from: bad, console: { _ in })
                Issue.record("\(label): restored from a bad record")
            } catch let error as MachineSnapshotError {
                guard case let .badDeviceState(message) = error else { Issue.record("\(label): \(error)"); continue }
                if label == "newer" { #expect(message.contains("version \(SavedPCIFunction.currentVersion + 1)"), "\(message)") }
            }
        }
    }
}
