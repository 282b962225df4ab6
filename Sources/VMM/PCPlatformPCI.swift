import Devices
import FoundationEssentials
import Synchronization
import VirtCore

/// The PC platform's PCI: one host bridge (configuration mechanism #1 at 0xCF8–0xCFF and
/// ECAM at `ecamBase`, bus 0 only), function 00:00.0 the host bridge itself, and virtio-pci
/// devices at 00:01.0, 00:02.0, … whose BARs are placed in the bridge's window the way
/// firmware would. MSI-X messages go to the local APICs as the I/O APIC's do.
public final class PCPlatformPCI: Sendable {
    public static let ecamBase = BootLayout.pciECAMBase
    public let bridge: PCIHostBridge
    private let memory: GuestMemory
    private let apic: LocalAPICBank
    private let nextDevice = Mutex<UInt8>(1)
    private let functions = Mutex<[AttachedPCIFunction]>([])

    init(machine: Machine, apic: LocalAPICBank) throws {
        bridge = PCIHostBridge(mmioBase: Self.ecamBase, buses: 1)
        memory = machine.memory
        self.apic = apic
        try machine.attach(bridge, firstPort: PCIHostBridge.configAddressPort, count: PCIHostBridge.portCount)
        try machine.attach(bridge, base: bridge.mmioBase, size: bridge.mmioSize)
        let host = PCIHostBridgeFunction()
        try bridge.attach(host, at: RequesterID(bus: 0, device: 0, function: 0), config: host.configuration)
    }

    /// An MSI/MSI-X message as x86 defines it: address 0xFEE…: destination ID in bits
    /// 19–12, destination mode (logical) in bit 2; data: vector in bits 7–0, delivery mode
    /// in bits 10–8.
    static func deliver(_ message: MSIX.Message, to apic: LocalAPICBank) {
        apic.deliverMessage(vector: message.vector, mode: message.data >> 8 & 7, logical: message.address & 4 != 0,
                            destination: UInt32(message.address >> 12 & 0xFF), level: false)
    }

    /// Puts `device` behind a virtio-pci transport in the next slot of bus 0; `recipe`
    /// makes it again when a snapshot is restored.
    func attach(_ device: any VirtioDevice, name: String, recipe: DeviceRecipe) throws -> VirtioPCITransport {
        let slot = nextDevice.withLock { n -> UInt8 in
            defer { n += 1 }
            return n
        }
        guard slot < 32 else { throw PCPlatformPCIError.slotsFull }
        let transport = try VirtioPCITransport(device: device, memory: memory, deliver: { [apic] message in Self.deliver(message, to: apic) },
                                               name: "\(name)@00:\(slot < 16 ? "0" : "")\(String(slot, radix: 16)).0")
        try bridge.attach(transport, at: RequesterID(bus: 0, device: slot, function: 0), config: transport.configuration)
        try bridge.assignBARs()
        functions.withLock { $0.append(AttachedPCIFunction(transport: transport, recipe: recipe, function: RequesterID(bus: 0, device: slot, function: 0))) }
        return transport
    }

    /// The virtio-pci transports attached, in slot order.
    public var virtioTransports: [VirtioPCITransport] { attachedFunctions.map(\.transport) }
    /// The virtio-pci functions attached, in slot order.
    var attachedFunctions: [AttachedPCIFunction] { functions.withLock { $0 } }
}

public enum PCPlatformPCIError: Error, Equatable, CustomStringConvertible {
    case noPCIBus
    case slotsFull

    public var description: String {
        switch self {
        case .noPCIBus: return "virtio-pci devices need the PC platform (--kernel)"
        case .slotsFull: return "PCI bus 0 has no free slot (31 devices at most)"
        }
    }
}

extension Machine {
    /// PC platform: the virtio-pci devices a `--kernel` machine can be given (virtio-mmio
    /// stays for the ELF guests, whose runtime finds devices in boot info).
    private func pcPCIBus() throws -> PCPlatformPCI {
        guard let pcPCI else { throw PCPlatformPCIError.noPCIBus }
        return pcPCI
    }

    /// virtio-blk over the raw disk image at `path`, on the PC platform's PCI bus.
    @discardableResult
    public func addVirtioPCIBlock(path: String, readOnly: Bool = false) throws -> VirtioPCITransport {
        try pcPCIBus().attach(try VirtioBlock(path: path, readOnly: readOnly), name: "virtio-blk", recipe: .virtioBlock(absolutePath: path, readOnly: readOnly))
    }

    /// virtio-net on a named attachment, on the PC platform's PCI bus.
    @discardableResult
    public func addVirtioPCINet(attachment: NetworkAttachment, mac: MACAddress = .random()) throws -> VirtioPCITransport {
        try pcPCIBus().attach(VirtioNet(mac: mac, backend: try attachment.makeBackend()), name: "virtio-net",
                              recipe: .virtioNet(attachment: attachment.description, mac: mac.description))
    }

    /// virtio-console on the PC platform's PCI bus: guest output goes to `output`.
    @discardableResult
    public func addVirtioPCIConsole(output: @escaping @Sendable ([UInt8]) -> Void) throws -> VirtioPCITransport {
        try pcPCIBus().attach(VirtioConsole(output: output), name: "virtio-console", recipe: .virtioConsole)
    }
}
