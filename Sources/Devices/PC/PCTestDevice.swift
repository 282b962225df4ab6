import Synchronization

/// QEMU's pc-testdev, the device kvm-unit-tests drives: a 32-bit scratch register at ports
/// 0xE0–0xE3 (read back as written, per byte lane; the same register again at 0xE8–0xEB,
/// where QEMU splits accesses into bytes, which comes to the same), a page "flush" at 0xE4
/// (QEMU re-protects the host page; nothing to do here), the interrupt lines at ports
/// 0x2000–0x2017 (the byte written sets line `port - 0x2000`), and 64 KiB of device memory
/// at 0xFF000000 that reads back what was written — emulated MMIO for the emulator tests.
public enum PCTestDevice {
    public static let registerPort: UInt16 = 0xE0
    public static let registerPortCount = 12
    public static let irqPort: UInt16 = 0x2000
    public static let memoryBase: UInt64 = 0xFF00_0000
    public static let memorySize: UInt64 = 0x1_0000

    /// Ports 0xE0–0xEB.
    public final class Register: PortIODevice, Sendable {
        public var name: String { "pc-testdev" }
        private let data = Mutex<UInt32>(0)
        public init() {}

        private static func lanes(_ offset: UInt16, _ size: UInt8) -> (shift: UInt32, mask: UInt32) {
            let shift = UInt32(offset & 3) * 8
            let bits = UInt32(min(size, 4)) * 8
            let mask: UInt32 = bits >= 32 ? ~0 : (1 << bits) - 1
            return (shift, mask << shift)
        }

        public func portRead(offset: UInt16, size: UInt8) -> UInt32 {
            guard offset < 4 || offset >= 8 else { return 0 }  // the flush port reads nothing
            let (shift, mask) = Self.lanes(offset, size)
            return (data.withLock { $0 } & mask) >> shift
        }

        public func portWrite(offset: UInt16, size: UInt8, value: UInt32) {
            guard offset < 4 || offset >= 8 else { return }
            let (shift, mask) = Self.lanes(offset, size)
            data.withLock { $0 = ($0 & ~mask) | ((value << shift) & mask) }
        }
    }

    /// Ports 0x2000–0x2017: the platform's interrupt lines (GSI 0–23; 0–15 reach the 8259 too).
    public final class InterruptLines: PortIODevice, Sendable {
        public var name: String { "pc-testdev-irq" }
        private let lines: PCInterruptLines
        public init(lines: PCInterruptLines) { self.lines = lines }
        public func portRead(offset: UInt16, size: UInt8) -> UInt32 { 0 }
        public func portWrite(offset: UInt16, size: UInt8, value: UInt32) { lines.set(Int(offset), value & 1 != 0) }
    }

    /// 0xFF000000–0xFF00FFFF: memory behind MMIO exits (little-endian bytes).
    public final class Memory: MMIODevice, Sendable {
        public var name: String { "pc-testdev-iomem" }
        private let bytes = Mutex([UInt8](repeating: 0, count: Int(PCTestDevice.memorySize)))
        public init() {}

        public func mmioRead(offset: UInt64, size: UInt8) -> UInt64 {
            bytes.withLock { b in
                var v: UInt64 = 0
                for k in 0..<Int(min(size, 8)) where offset + UInt64(k) < UInt64(b.count) {
                    v |= UInt64(b[Int(offset) + k]) << (8 * UInt64(k))
                }
                return v
            }
        }

        public func mmioWrite(offset: UInt64, size: UInt8, value: UInt64) {
            bytes.withLock { b in
                for k in 0..<Int(min(size, 8)) where offset + UInt64(k) < UInt64(b.count) {
                    b[Int(offset) + k] = UInt8(truncatingIfNeeded: value >> (8 * UInt64(k)))
                }
            }
        }
    }
}
