import Synchronization

/// The ACPI PM1a register blocks the FADT names: the event block (PM1_STS, write-1-to-clear,
/// and PM1_EN, at `eventBlock`) and the control block (PM1_CNT at `controlBlock`). SCI_EN
/// reads as set (the platform is always in ACPI mode). Writing SLP_EN with SLP_TYP = the
/// DSDT's S5 value powers the machine off through `powerOff`; other sleep states are not
/// offered (the DSDT names only \_S5).
public final class ACPIPowerManagement: PortIODevice, Sendable {
    public static let eventBlock: UInt16 = 0x600
    public static let controlBlock: UInt16 = 0x604
    public static let portCount = 6
    public var name: String { "acpi-pm" }

    /// PM1_STS, PM1_EN and PM1_CNT.
    public struct SavedState: Codable, Sendable, Equatable {
        fileprivate var status: UInt16 = 0, enable: UInt16 = 0, control: UInt16 = 1
    }
    private let registers = Mutex(SavedState())
    private let sleepTypeS5: UInt16
    private let powerOff: @Sendable () -> Void

    public init(sleepTypeS5: UInt16, powerOff: @escaping @Sendable () -> Void) {
        self.sleepTypeS5 = sleepTypeS5
        self.powerOff = powerOff
    }

    public var savedState: SavedState { registers.withLock { $0 } }

    public func restore(_ saved: SavedState) {
        registers.withLock { $0 = saved; $0.control |= 1 }  // SCI_EN stays set
    }

    /// The 16-bit register at byte `offset` and the byte within it.
    private static func register(_ offset: UInt16) -> (index: Int, shift: UInt16) {
        (Int(offset / 2), (offset & 1) * 8)
    }

    public func portRead(offset: UInt16, size: UInt8) -> UInt32 {
        registers.withLock { r in
            var value: UInt32 = 0
            for k in 0..<UInt16(size) where offset + k < UInt16(Self.portCount) {
                let (index, shift) = Self.register(offset + k)
                let word = index == 0 ? r.status : index == 1 ? r.enable : r.control
                value |= UInt32((word >> shift) & 0xFF) << (8 * UInt32(k))
            }
            return value
        }
    }

    public func portWrite(offset: UInt16, size: UInt8, value: UInt32) {
        let off = registers.withLock { r -> Bool in
            for k in 0..<UInt16(size) where offset + k < UInt16(Self.portCount) {
                let (index, shift) = Self.register(offset + k)
                let byte = UInt16((value >> (8 * UInt32(k))) & 0xFF) << shift
                let mask: UInt16 = 0xFF << shift
                switch index {
                case 0: r.status &= ~byte  // write 1 to clear
                case 1: r.enable = (r.enable & ~mask) | byte
                default: r.control = ((r.control & ~mask) | byte) | 1  // SCI_EN stays set
                }
            }
            let sleeping = r.control & (1 << 13) != 0
            r.control &= ~(1 << 13)  // SLP_EN reads as zero
            return sleeping && (r.control >> 10) & 7 == sleepTypeS5
        }
        if off { powerOff() }
    }
}
