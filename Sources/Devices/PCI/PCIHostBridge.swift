import Synchronization

/// A device behind the host bridge. The bridge owns the configuration spaces and calls
/// the device (under its lock) for what has side effects.
public protocol PCIDevice: AnyObject, Sendable {
    var name: String { get }
    /// After a guest configuration write to one of the device's functions. Returns the
    /// device's subordinate functions (SR-IOV VFs) when they changed, else nil.
    func configWritten(function: RequesterID, offset: Int, size: Int, config: inout PCIConfigSpace) -> [RequesterID: PCIConfigSpace]?
    /// Accesses inside a BAR of `function` (offset from the BAR's base).
    func barRead(function: RequesterID, bar: Int, offset: UInt64, size: UInt8, config: PCIConfigSpace) -> UInt64
    func barWrite(function: RequesterID, bar: Int, offset: UInt64, size: UInt8, value: UInt64, config: PCIConfigSpace)
}

public enum PCIError: Error, Equatable, Sendable, CustomStringConvertible {
    case functionInUse(RequesterID)
    case busOutOfRange(RequesterID, buses: Int)
    case barWindowFull(RequesterID, bar: Int)

    public var description: String {
        switch self {
        case let .functionInUse(f): return "PCI function \(f) is taken"
        case let .busOutOfRange(f, buses): return "PCI function \(f) is beyond the bridge's \(buses) buses"
        case let .barWindowFull(f, bar): return "BAR \(bar) of PCI function \(f) does not fit in the bridge's BAR window"
        }
    }
}

/// The PCI host bridge: configuration space through the legacy ports (0xCF8 address,
/// 0xCFC–0xCFF data: configuration mechanism #1) and through ECAM (1 MiB per bus, 4 KiB
/// per function), and the memory window where the guest places BARs. Absent functions
/// read all ones, as on real hardware.
///
/// One object is attached twice to the I/O bus: at the ports, and at `mmioBase` for
/// `mmioSize` bytes (ECAM first, then the BAR window).
public final class PCIHostBridge: PortIODevice, MMIODevice, Sendable {
    public static let configAddressPort: UInt16 = 0xCF8
    public static let portCount = 8
    public static let barWindowSize: UInt64 = 16 << 20

    public var name: String { "pci-host-bridge" }
    public let mmioBase: UInt64
    public let buses: Int
    public var ecamSize: UInt64 { UInt64(buses) << 20 }
    /// Where BARs may be placed: right after ECAM.
    public var barWindow: Range<UInt64> { (mmioBase + ecamSize)..<(mmioBase + ecamSize + Self.barWindowSize) }
    public var mmioSize: UInt64 { ecamSize + Self.barWindowSize }

    private struct Function {
        var config: PCIConfigSpace
        let device: any PCIDevice
        /// The function this one hangs off (a VF's PF), nil for a physical function.
        let parent: RequesterID?
    }
    private struct State {
        var address: UInt32 = 0
        var functions: [RequesterID: Function] = [:]
    }
    private let state = Mutex(State())

    public init(mmioBase: UInt64, buses: Int = 2) {
        precondition(buses >= 1 && buses <= 256 && mmioBase % (1 << 20) == 0, "1–256 buses, ECAM 1 MiB aligned")
        self.mmioBase = mmioBase
        self.buses = buses
    }

    public func attach(_ device: any PCIDevice, at function: RequesterID, config: PCIConfigSpace) throws(PCIError) {
        guard Int(function.bus) < buses else { throw .busOutOfRange(function, buses: buses) }
        try state.withLock { (s: inout State) throws(PCIError) in
            guard s.functions[function] == nil else { throw .functionInUse(function) }
            s.functions[function] = Function(config: config, device: device, parent: nil)
        }
    }

    /// A copy of a function's configuration space (nil: absent).
    public func config(of function: RequesterID) -> PCIConfigSpace? { state.withLock { $0.functions[function]?.config } }
    public var functions: [RequesterID] { state.withLock { $0.functions.keys.sorted() } }

    /// Gives a function the configuration space a snapshot saved (`PCIConfigSpace.restore`):
    /// its BARs decode where the guest had placed them from the next access on.
    public func restoreConfig(of function: RequesterID, savedBytes: [UInt8]) throws(DeviceStateError) {
        try state.withLock { (s: inout State) throws(DeviceStateError) in
            guard var fn = s.functions[function] else { throw DeviceStateError(device: "PCI \(function)", "no such function") }
            try fn.config.restore(savedBytes: savedBytes)
            s.functions[function] = fn
        }
    }

    // MARK: configuration access

    private func configRead(_ s: inout State, _ f: RequesterID, _ offset: Int, _ size: Int) -> UInt32 {
        guard let fn = s.functions[f] else { return size == 4 ? 0xFFFF_FFFF : (1 << (8 * UInt32(size))) - 1 }
        return fn.config.guestRead(offset: offset, size: size)
    }

    private func configWrite(_ s: inout State, _ f: RequesterID, _ offset: Int, _ size: Int, _ value: UInt32) {
        guard var fn = s.functions[f] else { return }
        fn.config.guestWrite(offset: offset, size: size, value: value)
        let changed = fn.device.configWritten(function: f, offset: offset, size: size, config: &fn.config)
        s.functions[f] = fn
        guard let subordinates = changed else { return }
        for (id, old) in s.functions where old.parent == f && subordinates[id] == nil { s.functions[id] = nil }
        for (id, config) in subordinates where Int(id.bus) < buses && (s.functions[id] == nil || s.functions[id]?.parent == f) {
            s.functions[id] = Function(config: config, device: fn.device, parent: f)
        }
    }

    /// Mechanism #1: bit 31 enable, bus 23–16, device 15–11, function 10–8, register 7–2.
    private static func decode(_ address: UInt32) -> (RequesterID, Int)? {
        guard address & 0x8000_0000 != 0 else { return nil }
        let f = RequesterID(bus: UInt8(address >> 16 & 0xFF), device: UInt8(address >> 11 & 31), function: UInt8(address >> 8 & 7))
        return (f, Int(address & 0xFC))
    }

    public func portRead(offset: UInt16, size: UInt8) -> UInt32 {
        state.withLock { s in
            if offset == 0 { return size == 4 ? s.address : 0xFFFF_FFFF }
            guard offset >= 4, let (f, register) = Self.decode(s.address) else { return 0xFFFF_FFFF }
            return configRead(&s, f, register + Int(offset - 4), Int(size))
        }
    }

    public func portWrite(offset: UInt16, size: UInt8, value: UInt32) {
        state.withLock { s in
            if offset == 0 {
                if size == 4 { s.address = value & 0x80FF_FFFC }
                return
            }
            guard offset >= 4, let (f, register) = Self.decode(s.address) else { return }
            configWrite(&s, f, register + Int(offset - 4), Int(size), value)
        }
    }

    // MARK: ECAM and BARs

    private static func ecamDecode(_ offset: UInt64) -> (RequesterID, Int) {
        (RequesterID(bus: UInt8(offset >> 20 & 0xFF), device: UInt8(offset >> 15 & 31), function: UInt8(offset >> 12 & 7)),
         Int(offset & 0xFFF))
    }

    /// The function and BAR whose window holds `address`, and the offset in it.
    private func barHit(_ s: State, _ address: UInt64) -> (RequesterID, Function, Int, UInt64)? {
        for (id, fn) in s.functions {
            for bar in 0..<6 {
                guard let size = fn.config.barSizes[bar], let base = fn.config.barAddress(bar), base != 0 else { continue }
                if address >= base && address - base < UInt64(size) { return (id, fn, bar, address - base) }
            }
        }
        return nil
    }

    public func mmioRead(offset: UInt64, size: UInt8) -> UInt64 {
        if offset < ecamSize {
            let (f, register) = Self.ecamDecode(offset)
            return UInt64(state.withLock { s in configRead(&s, f, register, min(Int(size), 4)) })
        }
        let value = barAccess(offset) { id, fn, bar, at in
            fn.device.barRead(function: id, bar: bar, offset: at, size: size, config: fn.config)
        }
        return value ?? (size == 8 ? .max : (1 << (8 * UInt64(size))) - 1)
    }

    public func mmioWrite(offset: UInt64, size: UInt8, value: UInt64) {
        if offset < ecamSize {
            let (f, register) = Self.ecamDecode(offset)
            state.withLock { s in configWrite(&s, f, register, min(Int(size), 4), UInt32(truncatingIfNeeded: value)) }
            return
        }
        _ = barAccess(offset) { id, fn, bar, at in
            fn.device.barWrite(function: id, bar: bar, offset: at, size: size, value: value, config: fn.config)
        }
    }

    /// Runs `body` on the BAR that decodes `offset`, outside the bridge's lock (a device
    /// may take its own lock and reach other VMs; the bridge lock only guards the map).
    private func barAccess<T>(_ offset: UInt64, _ body: (RequesterID, Function, Int, UInt64) -> T) -> T? {
        guard let (id, fn, bar, at) = state.withLock({ barHit($0, mmioBase + offset) }) else { return nil }
        return body(id, fn, bar, at)
    }

    /// Places every memory BAR still at 0 in the BAR window (naturally aligned, in function
    /// order) and turns on memory decoding: what PC firmware does before booting an OS that
    /// keeps the firmware's placement (Linux claims it rather than reassigning).
    public func assignBARs() throws(PCIError) {
        try state.withLock { (s: inout State) throws(PCIError) in
            // New BARs go above every BAR placed already (by an earlier call or the guest).
            var next = barWindow.lowerBound
            for fn in s.functions.values {
                for bar in 0..<6 {
                    guard let size = fn.config.barSizes[bar] else { continue }
                    let base = UInt64(fn.config.read32(PCIConfigSpace.bar0 + 4 * bar) & 0xFFFF_FFF0)
                    if barWindow.contains(base) { next = max(next, base + UInt64(size)) }
                }
            }
            for id in s.functions.keys.sorted() {
                guard var fn = s.functions[id] else { continue }
                var placed = false
                for bar in 0..<6 {
                    guard let size = fn.config.barSizes[bar].map(UInt64.init),
                          fn.config.read32(PCIConfigSpace.bar0 + 4 * bar) & 0xFFFF_FFF0 == 0 else { continue }
                    let base = (next + size - 1) & ~(size - 1)
                    guard base + size <= barWindow.upperBound else { throw .barWindowFull(id, bar: bar) }
                    fn.config.guestWrite(offset: PCIConfigSpace.bar0 + 4 * bar, size: 4, value: UInt32(base))
                    next = base + size
                    placed = true
                }
                if placed {
                    let command = fn.config.commandRegister | PCIConfigSpace.memorySpaceEnable
                    fn.config.guestWrite(offset: PCIConfigSpace.command, size: 2, value: UInt32(command))
                }
                s.functions[id] = fn
            }
        }
    }
}
