import Synchronization

/// QEMU's fw_cfg interface in its port form: a 16-bit selector at 0x510 and a byte-wide
/// data port at 0x511 that reads the selected item byte by byte. Items: the "QEMU"
/// signature, the interface ID (no DMA), RAM size, CPU count (boot and maximum) and a file
/// directory; unknown items read as zeros.
public final class FirmwareConfig: PortIODevice, Sendable {
    public static let port: UInt16 = 0x510
    public static let portCount = 2
    public var name: String { "fw-cfg" }

    public enum Item {
        public static let signature: UInt16 = 0x00, id: UInt16 = 0x01, ramSize: UInt16 = 0x03, cpuCount: UInt16 = 0x05
        public static let maxCPUs: UInt16 = 0x0F, fileDirectory: UInt16 = 0x19, firstFile: UInt16 = 0x20
    }

    private struct State { var selected: UInt16 = 0; var offset = 0 }
    private let state = Mutex(State())
    private let items: [UInt16: [UInt8]]

    /// `files`: named blobs listed in the file directory (name at most 55 bytes).
    public init(ramSize: UInt64, cpuCount: Int, files: [(name: String, contents: [UInt8])] = []) {
        func le<T: FixedWidthInteger>(_ v: T) -> [UInt8] { withUnsafeBytes(of: v.littleEndian) { Array($0) } }
        func be<T: FixedWidthInteger>(_ v: T) -> [UInt8] { withUnsafeBytes(of: v.bigEndian) { Array($0) } }
        var items: [UInt16: [UInt8]] = [
            Item.signature: Array("QEMU".utf8),
            Item.id: le(UInt32(1)),
            Item.ramSize: le(ramSize),
            Item.cpuCount: le(UInt16(cpuCount)),
            Item.maxCPUs: le(UInt16(cpuCount)),
        ]
        var directory = be(UInt32(files.count))
        for (k, file) in files.enumerated() {
            let selector = Item.firstFile + UInt16(k)
            items[selector] = file.contents
            var name = Array(file.name.utf8.prefix(55))
            name += [UInt8](repeating: 0, count: 56 - name.count)
            directory += be(UInt32(file.contents.count)) + be(selector) + be(UInt16(0)) + name
        }
        items[Item.fileDirectory] = directory
        self.items = items
    }

    public func portRead(offset: UInt16, size: UInt8) -> UInt32 {
        guard offset == 1 else { return 0 }
        return state.withLock { s in
            var v: UInt32 = 0
            for k in 0..<Int(size) {
                let item = items[s.selected & 0x3FFF]
                if let item, s.offset < item.count { v |= UInt32(item[s.offset]) << (8 * UInt32(k)) }
                s.offset += 1
            }
            return v
        }
    }

    public func portWrite(offset: UInt16, size: UInt8, value: UInt32) {
        guard offset == 0 else { return }
        state.withLock { s in
            s.selected = UInt16(truncatingIfNeeded: value)
            s.offset = 0
        }
    }
}

/// The 8259A pair's registers (0x20–0x21 and 0xA0–0xA1): the initialisation sequence and
/// the interrupt masks are accepted and read back. Interrupts are delivered through the
/// local APIC and I/O APIC, so the PIC itself never raises one.
public final class LegacyPIC: PortIODevice, Sendable {
    public var name: String { "8259-pic" }
    public static let masterPort: UInt16 = 0x20, slavePort: UInt16 = 0xA0
    /// The mask, where initialisation stands and OCW3's register choice.
    public struct SavedState: Codable, Sendable, Equatable {
        fileprivate var mask: UInt8 = 0xFF, initStep = 0, readISR = false
    }
    private let chip = Mutex(SavedState())

    public init() {}

    public var savedState: SavedState { chip.withLock { $0 } }

    public func restore(_ saved: SavedState) throws(DeviceStateError) {
        guard (0...3).contains(saved.initStep) else { throw DeviceStateError(device: name, "initialisation step \(saved.initStep)") }
        chip.withLock { $0 = saved }
    }

    public func portRead(offset: UInt16, size: UInt8) -> UInt32 {
        chip.withLock { c in offset == 1 ? UInt32(c.mask) : 0 }  // IRR/ISR: nothing pending
    }

    public func portWrite(offset: UInt16, size: UInt8, value: UInt32) {
        let v = UInt8(truncatingIfNeeded: value)
        chip.withLock { c in
            if offset == 0 {
                if v & 0x10 != 0 { c.initStep = 1; c.mask = 0 }  // ICW1
                else if v & 0x18 == 0x08 { c.readISR = v & 3 == 3 }  // OCW3
            } else if c.initStep > 0 {
                c.initStep = c.initStep == 3 ? 0 : c.initStep + 1  // ICW2…ICW4
            } else {
                c.mask = v  // OCW1
            }
        }
    }
}

/// QEMU's isa-debug-exit: a write of `code` stops the VM with exit status
/// `(code << 1) | 1`, so 1 means the guest reported success with code 0.
public final class DebugExitPort: PortIODevice, Sendable {
    public static let port: UInt16 = 0xF4
    public var name: String { "isa-debug-exit" }
    private let onExit: @Sendable (UInt8) -> Void

    public init(onExit: @escaping @Sendable (UInt8) -> Void) { self.onExit = onExit }

    public func portRead(offset: UInt16, size: UInt8) -> UInt32 { 0 }
    public func portWrite(offset: UInt16, size: UInt8, value: UInt32) {
        onExit(UInt8(truncatingIfNeeded: (value << 1) | 1))
    }
}
