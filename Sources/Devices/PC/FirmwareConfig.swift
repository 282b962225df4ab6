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
