/// Numbers fixed by the virtio 1.x specification (OASIS virtio v1.2). Kept in one place so
/// the transport, the queues and the devices cannot disagree about a bit.

/// A virtio device type (spec 5, "Device Types"). A struct rather than an enum so a VMM can
/// add device types (balloon, entropy, …) without touching this file.
public struct VirtioDeviceID: RawRepresentable, Hashable, Sendable, CustomStringConvertible {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }

    public static let network = VirtioDeviceID(rawValue: 1)
    public static let block = VirtioDeviceID(rawValue: 2)
    public static let console = VirtioDeviceID(rawValue: 3)
    public static let entropy = VirtioDeviceID(rawValue: 4)
    public static let balloon = VirtioDeviceID(rawValue: 5)

    public var description: String {
        switch rawValue {
        case 1: return "net"
        case 2: return "block"
        case 3: return "console"
        case 4: return "entropy"
        case 5: return "balloon"
        default: return "device-\(rawValue)"
        }
    }
}

/// Device-independent feature bits (spec 6, "Reserved Feature Bits").
public enum VirtioFeature {
    /// Descriptors may point at a table of further descriptors. Not offered: chains are
    /// walked in the main table only, and a chain using it is a driver error.
    public static let indirectDescriptors: UInt64 = 1 << 28
    /// used_event / avail_event interrupt suppression. Not offered.
    public static let eventIndex: UInt64 = 1 << 29
    /// "This is a virtio 1.x device": modern layout, little-endian. Always offered and
    /// required — this transport has no legacy (0.9) mode.
    public static let version1: UInt64 = 1 << 32
    public static let accessPlatform: UInt64 = 1 << 33
    public static let ringPacked: UInt64 = 1 << 34
}

/// The device status field (spec 2.1).
public enum VirtioStatus {
    public static let acknowledge: UInt8 = 0x01
    public static let driver: UInt8 = 0x02
    public static let driverOK: UInt8 = 0x04
    public static let featuresOK: UInt8 = 0x08
    /// Set by the device only: it hit an error it cannot recover from without a reset.
    public static let deviceNeedsReset: UInt8 = 0x40
    public static let failed: UInt8 = 0x80

    /// Bits a driver may write; anything else in a Status write is a protocol violation.
    static let driverWritable: UInt8 = acknowledge | driver | driverOK | featuresOK | failed
}

/// InterruptStatus bits of virtio-mmio (spec 4.2.2).
public enum VirtioInterrupt {
    /// "Used Buffer Notification": the device added buffers to a used ring.
    public static let usedBuffer: UInt32 = 0x1
    /// "Configuration Change Notification": config space changed or DEVICE_NEEDS_RESET set.
    public static let configurationChange: UInt32 = 0x2
}

/// Split-virtqueue descriptor flags (spec 2.7.5).
enum VirtqDescriptorFlag {
    static let next: UInt16 = 1
    static let write: UInt16 = 2
    static let indirect: UInt16 = 4
}

/// Available-ring flags (spec 2.7.6): the driver asks not to be interrupted.
enum VirtqAvailFlag {
    static let noInterrupt: UInt16 = 1
}
