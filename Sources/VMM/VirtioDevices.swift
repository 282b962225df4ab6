import Devices
import VirtCore

/// The virtio-mmio devices a machine can be given; each takes the next MMIO slot and
/// interrupt and appears in boot info for the guest runtime's drivers (Guests/runtime/virtio.c).
extension Machine {
    /// virtio-blk over the raw disk image at `path` (locked while the VM holds it).
    @discardableResult
    public func addVirtioBlock(path: String, readOnly: Bool = false) throws -> VirtioMMIOTransport {
        let disk = try VirtioBlock(path: path, readOnly: readOnly)
        return try addVirtioDevice(disk, name: "virtio-blk")
    }

    /// virtio-console: guest output goes to `output`; feed input with
    /// `(transport.device as! VirtioConsole).receive(_:)`.
    @discardableResult
    public func addVirtioConsole(output: @escaping @Sendable ([UInt8]) -> Void) throws -> VirtioMMIOTransport {
        try addVirtioDevice(VirtioConsole(output: output), name: "virtio-console")
    }

    /// Any virtio device behind a virtio-mmio transport in the next slot.
    @discardableResult
    public func addVirtioDevice(_ device: any VirtioDevice, name: String) throws -> VirtioMMIOTransport {
        try addMMIODevice(type: .virtioMMIO) { slot in
            VirtioMMIOTransport(device: device, memory: memory, interrupt: slot.interrupt, name: "\(name)@\(slot.index)")
        }
    }
}
