import Synchronization
import VirtCore

/// A device reached through port I/O. Called from vCPU threads, so implementations
/// synchronise their own state.
public protocol PortIODevice: AnyObject, Sendable {
    var name: String { get }
    /// `offset` is relative to the first port of the range the device was attached at.
    func portRead(offset: UInt16, size: UInt8) -> UInt32
    func portWrite(offset: UInt16, size: UInt8, value: UInt32)
}

/// A device reached through memory-mapped I/O (guest-physical addresses with no RAM).
public protocol MMIODevice: AnyObject, Sendable {
    var name: String { get }
    func mmioRead(offset: UInt64, size: UInt8) -> UInt64
    func mmioWrite(offset: UInt64, size: UInt8, value: UInt64)
}

/// A device's interrupt output, level-style: called with `true` when the device asserts
/// its line (for virtio: InterruptStatus became non-zero) and `false` when it deasserts.
/// The VMM turns a rising edge into one interrupt delivered to a vCPU. Called from any
/// thread.
public typealias InterruptLine = @Sendable (_ asserted: Bool) -> Void

public enum IOBusError: Error, Equatable, CustomStringConvertible {
    case portRangeOverlaps(first: UInt16, count: Int, existing: String)
    case mmioRangeOverlaps(base: UInt64, size: UInt64, existing: String)
    case emptyRange
    case tooManyPortDevices

    public var description: String {
        switch self {
        case let .portRangeOverlaps(first, count, existing):
            return "ports 0x\(String(first, radix: 16))+\(count) overlap device \(existing)"
        case let .mmioRangeOverlaps(base, size, existing):
            return "MMIO 0x\(String(base, radix: 16))+0x\(String(size, radix: 16)) overlaps device \(existing)"
        case .emptyRange:
            return "an I/O range must not be empty"
        case .tooManyPortDevices:
            return "a bus holds at most 255 port devices"
        }
    }
}

/// Where a guest access landed: the device's range base (for exit accounting), or nil
/// when nothing is attached there.
public typealias RangeBase = UInt64

/// Collects a machine's devices before it starts. `freeze()` makes the `IOBus` the vCPUs
/// use: what is attached where cannot change once guest code runs.
public struct IOBusBuilder: Sendable {
    fileprivate struct PortRange: Sendable { let first: UInt16; let count: Int; let device: any PortIODevice }
    fileprivate struct MMIORange: Sendable { let base: UInt64; let size: UInt64; let device: any MMIODevice }

    fileprivate private(set) var portRanges: [PortRange] = []
    /// Port → index+1 into `portRanges` (0 = no device).
    fileprivate private(set) var portTable = [UInt8](repeating: 0, count: 65536)
    fileprivate private(set) var mmioRanges: [MMIORange] = []

    public init() {}

    public mutating func attach(_ device: any PortIODevice, firstPort: UInt16, count: Int) throws(IOBusError) {
        guard count > 0, Int(firstPort) + count <= 65536 else { throw .emptyRange }
        for p in Int(firstPort)..<(Int(firstPort) + count) where portTable[p] != 0 {
            throw .portRangeOverlaps(first: firstPort, count: count, existing: portRanges[Int(portTable[p]) - 1].device.name)
        }
        guard portRanges.count < 255 else { throw .tooManyPortDevices }
        portRanges.append(PortRange(first: firstPort, count: count, device: device))
        for p in Int(firstPort)..<(Int(firstPort) + count) { portTable[p] = UInt8(portRanges.count) }
    }

    public mutating func attach(_ device: any MMIODevice, base: UInt64, size: UInt64) throws(IOBusError) {
        guard size > 0, base &+ size > base else { throw .emptyRange }
        if let other = mmioRanges.first(where: { base < $0.base + $0.size && $0.base < base + size }) {
            throw .mmioRangeOverlaps(base: base, size: size, existing: other.device.name)
        }
        mmioRanges.append(MMIORange(base: base, size: size, device: device))
        mmioRanges.sort { $0.base < $1.base }
    }

    /// Names of the MMIO devices attached so far.
    public var mmioDeviceNames: [String] { mmioRanges.map(\.device.name) }

    /// The bus as assembled; the builder can go on to make another.
    public func freeze() -> IOBus { IOBus(self) }
}

/// Dispatches port and MMIO accesses to devices. Immutable (made by `IOBusBuilder.freeze()`),
/// so lookups need no locks: a 64 Ki-entry port table and a short sorted list of MMIO ranges.
public final class IOBus: Sendable {
    private let portRanges: [IOBusBuilder.PortRange]
    private let portTable: [UInt8]
    private let mmioRanges: [IOBusBuilder.MMIORange]
    /// Accesses nobody handled (reads return all ones; writes are dropped).
    private let unhandledCount = Atomic<UInt64>(0)

    fileprivate init(_ builder: IOBusBuilder) {
        portRanges = builder.portRanges
        portTable = builder.portTable
        mmioRanges = builder.mmioRanges
    }

    public var unhandledAccesses: UInt64 { unhandledCount.load(ordering: .relaxed) }

    /// Name of the device at `port`, for statistics tables.
    public func deviceName(port: UInt16) -> String? {
        let i = Int(portTable[Int(port)])
        return i == 0 ? nil : portRanges[i - 1].device.name
    }

    /// Names of the MMIO devices attached.
    public var mmioDeviceNames: [String] { mmioRanges.map(\.device.name) }

    public func deviceName(mmioBase: UInt64) -> String? {
        mmioRanges.first { $0.base == mmioBase }?.device.name
    }

    @inline(__always)
    public func portRead(_ port: UInt16, size: UInt8) -> UInt32 {
        let i = Int(portTable[Int(port)])
        guard i != 0 else {
            unhandledCount.add(1, ordering: .relaxed)
            return size >= 4 ? 0xFFFF_FFFF : (1 << (UInt32(size) * 8)) - 1
        }
        let r = portRanges[i - 1]
        return r.device.portRead(offset: port &- r.first, size: size)
    }

    @inline(__always)
    public func portWrite(_ port: UInt16, size: UInt8, value: UInt32) {
        let i = Int(portTable[Int(port)])
        guard i != 0 else {
            unhandledCount.add(1, ordering: .relaxed)
            return
        }
        let r = portRanges[i - 1]
        r.device.portWrite(offset: port &- r.first, size: size, value: value)
    }

    @inline(__always)
    private func mmioRange(_ address: UInt64) -> IOBusBuilder.MMIORange? {
        for r in mmioRanges where address >= r.base && address - r.base < r.size { return r }
        return nil
    }

    /// Reads from the device at `address`; returns the value and the range base (nil when
    /// nothing is attached, in which case the value is all ones).
    @inline(__always)
    public func mmioRead(_ address: UInt64, size: UInt8) -> (value: UInt64, range: RangeBase?) {
        guard let r = mmioRange(address) else {
            unhandledCount.add(1, ordering: .relaxed)
            return (size >= 8 ? UInt64.max : (1 << (UInt64(size) * 8)) - 1, nil)
        }
        return (r.device.mmioRead(offset: address - r.base, size: size), r.base)
    }

    @inline(__always)
    @discardableResult
    public func mmioWrite(_ address: UInt64, size: UInt8, value: UInt64) -> RangeBase? {
        guard let r = mmioRange(address) else {
            unhandledCount.add(1, ordering: .relaxed)
            return nil
        }
        r.device.mmioWrite(offset: address - r.base, size: size, value: value)
        return r.base
    }
}
