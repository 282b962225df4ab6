import Synchronization
import VirtCore

/// What a device may ask of the transport it is attached to, from any thread.
public protocol VirtioTransportHandle: AnyObject, Sendable {
    /// Processes queue `index` now, as if the driver had notified it: used when the host
    /// side has work for the guest (console input, a received frame). Does nothing unless
    /// the driver has set DRIVER_OK and made the queue ready. Must not be called from
    /// inside `VirtioDevice.process` (the transport lock is held there).
    func processQueue(_ index: Int)
    /// The device's configuration space changed: bumps ConfigGeneration and raises a
    /// configuration-change interrupt.
    func configurationChanged()
}

/// A virtio device model, independent of the transport that exposes it.
///
/// Threading contract: the transport serialises `process`, `reset`, `activate`,
/// `readConfig`/`writeConfig` and `accepts` under its own lock, so a device sees them
/// one at a time; they must not call anything that could re-enter the transport.
/// `performDeferredWork` runs afterwards without that lock, and is where a device hands
/// data to the outside world (a console's output sink, a network backend) — doing that
/// under the lock could deadlock two VMs sending to each other.
public protocol VirtioDevice: AnyObject, Sendable {
    var name: String { get }
    var deviceID: VirtioDeviceID { get }
    /// Device-specific feature bits offered (VIRTIO_F_VERSION_1 is added by the transport).
    var offeredFeatures: UInt64 { get }
    /// QueueNumMax of each queue; the count is the number of queues.
    var queueMaxSizes: [UInt16] { get }
    /// The current configuration space, little-endian as the guest sees it at 0x100.
    func configSpace() -> [UInt8]
    /// A driver write of `bytes` at `offset` into the configuration space (already
    /// bounds-checked against `configSpace().count`). Most fields are read-only.
    func writeConfig(offset: Int, bytes: [UInt8])
    /// Whether the device can work with the negotiated `features` (already checked to be
    /// a subset of what was offered and to include VERSION_1).
    func accepts(features: UInt64) -> Bool
    /// Called once when the device is given to a transport.
    func attach(to transport: any VirtioTransportHandle)
    /// DRIVER_OK was set with `features`. Throwing sets DEVICE_NEEDS_RESET.
    func activate(features: UInt64) throws(VirtioDeviceError)
    /// The driver notified queue `index` (or the host asked through `processQueue`).
    /// Request-level problems are handled here (fail the request, count the fault);
    /// throwing means the queue is unusable and the device needs a reset.
    func process(queue index: Int, _ queue: inout VirtioQueue, memory: GuestMemory,
                 diagnostics: VirtioDiagnostics) throws(VirtqueueError)
    /// Status ← 0: forget everything negotiated. Host-side resources stay open.
    func reset()
    /// Hands finished work to the outside world; see the threading contract above.
    func performDeferredWork()
    /// Device-internal state a snapshot must keep (beyond the transport's registers and
    /// queues); empty for devices whose state lives in guest memory or on the host.
    func savedDeviceState() -> [UInt8]
    /// Takes back `savedDeviceState()` in a fresh device.
    func restoreDeviceState(_ bytes: [UInt8]) throws
}

extension VirtioDevice {
    public func writeConfig(offset: Int, bytes: [UInt8]) {}
    public func accepts(features: UInt64) -> Bool { true }
    public func attach(to transport: any VirtioTransportHandle) {}
    public func activate(features: UInt64) throws(VirtioDeviceError) {}
    public func performDeferredWork() {}
    public func savedDeviceState() -> [UInt8] { [] }
    public func restoreDeviceState(_ bytes: [UInt8]) throws {}
}

/// A device-side failure that is not about one ring or chain.
public struct VirtioDeviceError: VirtioFault, Equatable {
    public let kind: String
    public let message: String
    public init(kind: String, message: String) {
        self.kind = kind
        self.message = message
    }
    public var description: String { message }
}

/// A weak reference to a transport, so a device (owned by its transport) does not keep
/// the transport alive.
struct WeakTransport {
    weak var value: (any VirtioTransportHandle)?
}

/// Little-endian builder for configuration spaces.
struct ConfigWriter {
    private(set) var bytes: [UInt8] = []
    mutating func put<T: FixedWidthInteger>(_ value: T) {
        withUnsafeBytes(of: value.littleEndian) { bytes.append(contentsOf: $0) }
    }
    mutating func put(_ raw: [UInt8]) { bytes += raw }
}
