import Devices
import FoundationEssentials
import VirtCore

/// A virtio-pci function of the PC platform: its transport, how to make its device again,
/// and where it sits on the bus.
struct AttachedPCIFunction: Sendable {
    var transport: VirtioPCITransport
    var recipe: DeviceRecipe
    var function: RequesterID
}

/// One virtio-pci function's record in a snapshot or migration stream: configuration space
/// as the guest programmed it (command register, BAR addresses, interrupt line, MSI-X
/// enable and mask) and the transport's state. The device's own state is a record of its
/// own, as for virtio-mmio.
struct SavedPCIFunction: Codable, Equatable {
    /// Bumped when the record changes so an older reader refuses it instead of guessing.
    static let currentVersion = 1
    var version: Int
    /// The device number on bus 0.
    var slot: UInt8
    var config: [UInt8]
    var transport: VirtioPCITransport.SavedState
}

extension DeviceRecipe {
    /// A virtio-blk recipe with `path` made absolute, so a restore elsewhere finds the image.
    static func virtioBlock(absolutePath path: String, readOnly: Bool) -> DeviceRecipe {
        .virtioBlock(path: path.hasPrefix("/") ? path : FileManager.default.currentDirectoryPath + "/" + path, readOnly: readOnly)
    }
}

extension Machine {
    /// The record listing the PC platform's virtio-pci devices (their recipes, slot order).
    static let pciManifestName = "pci-devices"

    /// Every transport a snapshot or migration freezes: virtio-mmio and virtio-pci.
    var freezableTransports: [any FreezableTransport] {
        attachedDevices.compactMap(\.transport) + (pcPCI?.virtioTransports ?? [])
    }

    /// The virtio-pci records: the manifest, then each function's and its device's state.
    /// Call with the vCPUs paused and the transports frozen.
    func pciDeviceRecords() throws -> [(name: String, state: [UInt8])] {
        guard let pci = pcPCI else { return [] }
        let attached = pci.attachedFunctions
        guard !attached.isEmpty else { return [] }
        let encoder = JSONEncoder()
        var records: [(name: String, state: [UInt8])] = [(Self.pciManifestName, Array(try encoder.encode(attached.map(\.recipe))))]
        for (i, f) in attached.enumerated() {
            guard let config = pci.bridge.config(of: f.function) else {
                throw MachineSnapshotError.notSavableNow("PCI function \(f.function) vanished from the bus")
            }
            let saved = SavedPCIFunction(version: SavedPCIFunction.currentVersion, slot: f.function.device,
                                         config: config.savedBytes, transport: f.transport.savedState)
            records.append(("pci\(i)", Array(try encoder.encode(saved))))
            records.append(("pci\(i).device", f.transport.device.savedDeviceState()))
        }
        return records
    }

    /// Rebuilds the saved virtio-pci devices in their slots (after the PC platform) and gives
    /// each its configuration space, transport and device state back.
    func restorePCIDevices(from records: [(name: String, state: [UInt8])], console: @escaping @Sendable (UInt8) -> Void) throws {
        guard let manifest = records.first(where: { $0.name == Self.pciManifestName }) else { return }
        guard let pci = pcPCI else { throw MachineSnapshotError.badDeviceState("virtio-pci devices without the PC platform") }
        let decoder = JSONDecoder()
        let recipes: [DeviceRecipe]
        do { recipes = try decoder.decode([DeviceRecipe].self, from: Data(manifest.state)) } catch {
            throw MachineSnapshotError.badDeviceState("virtio-pci device list: \(error)")
        }
        for (i, recipe) in recipes.enumerated() {
            do {
                try restorePCIDevice(i, recipe: recipe, records: records, on: pci, console: console)
            } catch let e as MachineSnapshotError {
                throw e
            } catch {
                throw MachineSnapshotError.badDeviceState("virtio-pci device \(i): \(error)")
            }
        }
    }

    private func restorePCIDevice(_ i: Int, recipe: DeviceRecipe, records: [(name: String, state: [UInt8])], on pci: PCPlatformPCI,
                                  console: @escaping @Sendable (UInt8) -> Void) throws {
        guard let record = records.first(where: { $0.name == "pci\(i)" }) else {
            throw MachineSnapshotError.badDeviceState("no state for virtio-pci device \(i)")
        }
        let saved = try JSONDecoder().decode(SavedPCIFunction.self, from: Data(record.state))
        guard saved.version <= SavedPCIFunction.currentVersion else {
            throw MachineSnapshotError.badDeviceState("virtio-pci device \(i): record version \(saved.version) is newer than this build reads (\(SavedPCIFunction.currentVersion))")
        }
        let transport: VirtioPCITransport
        switch recipe {
        case let .virtioBlock(path, readOnly): transport = try addVirtioPCIBlock(path: path, readOnly: readOnly)
        case let .virtioNet(attachment, mac):
            guard let a = NetworkAttachment(attachment), let address = MACAddress(mac) else {
                throw MachineSnapshotError.badDeviceState("network attachment \(attachment) / \(mac)")
            }
            transport = try addVirtioPCINet(attachment: a, mac: address)
        case .virtioConsole: transport = try addVirtioPCIConsole { bytes in bytes.forEach(console) }
        case .virtioBalloon, .unsupported:
            throw MachineSnapshotError.badDeviceState("virtio-pci device \(i) (\(recipe)) cannot be restored")
        }
        guard let function = pci.attachedFunctions.last?.function, function.device == saved.slot else {
            throw MachineSnapshotError.badDeviceState("virtio-pci device \(i) went into another slot than 00:\(saved.slot)")
        }
        try transport.device.restoreDeviceState(records.first { $0.name == "pci\(i).device" }?.state ?? [])
        try pci.bridge.restoreConfig(of: function, savedBytes: saved.config)
        guard let config = pci.bridge.config(of: function) else { throw MachineSnapshotError.badDeviceState("PCI function \(function) vanished") }
        try transport.restore(saved.transport, config: config)
    }
}
