import Devices
import FoundationEssentials
import VirtCore

/// The virtio-mmio devices a machine can be given; each takes the next MMIO slot and
/// interrupt and appears in boot info for the guest runtime's drivers (Guests/runtime/virtio.c).
extension Machine {
    /// virtio-blk over the raw disk image at `path` (locked while the VM holds it).
    @discardableResult
    public func addVirtioBlock(path: String, readOnly: Bool = false) throws -> VirtioMMIOTransport {
        let disk = try VirtioBlock(path: path, readOnly: readOnly)
        return try addVirtioDevice(disk, name: "virtio-blk", recipe: .virtioBlock(absolutePath: path, readOnly: readOnly))
    }

    /// virtio-console: guest output goes to `output`; feed input with
    /// `(transport.device as! VirtioConsole).receive(_:)`.
    @discardableResult
    public func addVirtioConsole(output: @escaping @Sendable ([UInt8]) -> Void) throws -> VirtioMMIOTransport {
        try addVirtioDevice(VirtioConsole(output: output), name: "virtio-console", recipe: .virtioConsole)
    }

    /// virtio-balloon: set its target with `balloon.setTarget(pages:)`; inflated pages are
    /// discarded from guest RAM, so the host gets the memory back.
    @discardableResult
    public func addVirtioBalloon(target: UInt32 = 0, onChange: @escaping @Sendable () -> Void = {}) throws -> VirtioBalloon {
        let balloon = VirtioBalloon(target: target, onChange: onChange)
        _ = try addVirtioDevice(balloon, name: "virtio-balloon", recipe: .virtioBalloon)
        self.balloon = balloon
        return balloon
    }

    /// Any virtio device behind a virtio-mmio transport in the next slot.
    @discardableResult
    public func addVirtioDevice(_ device: any VirtioDevice, name: String) throws -> VirtioMMIOTransport {
        try addVirtioDevice(device, name: name, recipe: nil)
    }

    func addVirtioDevice(_ device: any VirtioDevice, name: String, recipe: DeviceRecipe?) throws -> VirtioMMIOTransport {
        var base: UInt64 = 0
        let transport = try addMMIODevice(type: .virtioMMIO, recipe: recipe) { slot in
            base = slot.base
            return VirtioMMIOTransport(device: device, memory: memory, interrupt: slot.interrupt, name: "\(name)@\(slot.index)")
        }
        if configuration.ioeventfd, let offload = vm as? any NotificationOffload, offload.notificationOffloadAvailable {
            if doorbells == nil { doorbells = try DoorbellThread(vm: offload) }
            try doorbells?.add(transport, base: base)
        }
        return transport
    }
}

/// A network attachment as the command line names it: `switch:NAME` (a learning switch
/// shared by the VMs of this process) or `tap:IFNAME` (a host TAP interface).
public enum NetworkAttachment: Sendable, Equatable, CustomStringConvertible {
    case networkSwitch(String)
    case tap(String)

    public init?(_ text: String) {
        let parts = text.split(separator: ":", maxSplits: 1).map(String.init)
        guard parts.count == 2, !parts[1].isEmpty else { return nil }
        switch parts[0] {
        case "switch": self = .networkSwitch(parts[1])
        case "tap": self = .tap(parts[1])
        default: return nil
        }
    }

    public var description: String {
        switch self {
        case let .networkSwitch(name): return "switch:\(name)"
        case let .tap(name): return "tap:\(name)"
        }
    }

    /// A fresh backend: a new port on the named switch, or the TAP interface opened.
    public func makeBackend() throws -> any NetworkBackend {
        switch self {
        case let .networkSwitch(name): return NetworkSwitch.named(name).makePort()
        case let .tap(name): return try TAPBackend(interfaceName: name)
        }
    }
}

extension Machine {
    /// The virtio transports attached, in slot order.
    public var virtioTransports: [VirtioMMIOTransport] { attachedDevices.compactMap(\.transport) }

    /// virtio-net on `backend`, with `mac` (default: a random locally administered one).
    @discardableResult
    public func addVirtioNet(backend: any NetworkBackend, mac: MACAddress = .random()) throws -> VirtioMMIOTransport {
        try addVirtioDevice(VirtioNet(mac: mac, backend: backend), name: "virtio-net", recipe: nil)
    }

    /// virtio-net on a named attachment (kept in snapshots, so a restored VM rejoins it).
    @discardableResult
    public func addVirtioNet(attachment: NetworkAttachment, mac: MACAddress = .random()) throws -> VirtioMMIOTransport {
        try addVirtioDevice(VirtioNet(mac: mac, backend: attachment.makeBackend()), name: "virtio-net",
                            recipe: .virtioNet(attachment: attachment.description, mac: mac.description))
    }

    /// The emulated register-interface NIC (scenario S2) on `backend`.
    @discardableResult
    public func addEmulatedNIC(backend: any NetworkBackend, mac: MACAddress = .random()) throws -> EmulatedNIC {
        try addMMIODevice(type: .emulatedNIC) { slot in
            EmulatedNIC(memory: memory, backend: backend, mac: mac, interrupt: slot.interrupt, name: "emulated-nic@\(slot.index)")
        }
    }
}

/// How to make an attached device again, kept in snapshots so a restore rebuilds the
/// machine's devices in the same slots.
public enum DeviceRecipe: Codable, Sendable, Equatable {
    case virtioBlock(path: String, readOnly: Bool)
    case virtioNet(attachment: String, mac: String)
    case virtioConsole
    case virtioBalloon
    /// A device whose state a snapshot cannot carry (the emulated NIC, test devices).
    case unsupported(String)
}

/// One MMIO slot's device.
struct AttachedDevice {
    var recipe: DeviceRecipe
    var transport: VirtioMMIOTransport?
}
