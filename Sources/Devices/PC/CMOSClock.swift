#if canImport(Glibc)
import Glibc
#endif
import Synchronization

/// The MC146818 real-time clock and CMOS RAM behind ports 0x70 (index; bit 7 is the NMI
/// mask, ignored) and 0x71 (data). The clock reads the host's UTC time at each access, in
/// BCD or binary and 24- or 12-hour form as register B asks; no update is ever in progress
/// (register A's UIP stays clear, so a kernel polling it never waits). The other 114 bytes
/// are plain CMOS RAM. Writes to the time registers are accepted and forgotten (the clock
/// always follows the host); no periodic, alarm or update interrupts.
public final class CMOSClock: PortIODevice, Sendable {
    public static let port: UInt16 = 0x70
    public var name: String { "cmos-rtc" }

    /// The index register and CMOS RAM (the time registers always follow the host clock).
    public struct SavedState: Codable, Sendable, Equatable {
        fileprivate var index: UInt8 = 0
        fileprivate var ram = [UInt8](repeating: 0, count: 128)
    }
    private typealias State = SavedState
    private let state: Mutex<State>
    /// Seconds since the epoch, UTC (the host clock; a test may fix it).
    private let now: @Sendable () -> Int

    public init(now: @escaping @Sendable () -> Int = { Int(time(nil)) }) {
        var s = State()
        s.ram[0x0A] = 0x26  // 32.768 kHz time base, 1024 Hz rate; UIP clear
        s.ram[0x0B] = 0x02  // 24-hour, BCD
        s.ram[0x0D] = 0x80  // valid RAM and time
        state = Mutex(s)
        self.now = now
    }

    public func portRead(offset: UInt16, size: UInt8) -> UInt32 {
        guard offset == 1 else { return 0xFF }  // the index port is write-only
        let (index, mode) = state.withLock { ($0.index, $0.ram[0x0B]) }
        if let value = timeRegister(index, mode: mode) { return UInt32(value) }
        return state.withLock { s in
            let v = s.ram[Int(index)]
            if index == 0x0C { s.ram[0x0C] = 0 }  // flags clear on read
            return UInt32(v)
        }
    }

    public func portWrite(offset: UInt16, size: UInt8, value: UInt32) {
        let byte = UInt8(truncatingIfNeeded: value)
        state.withLock { s in
            if offset == 0 { s.index = byte & 0x7F; return }
            switch s.index {
            case 0x00...0x09, 0x0C, 0x0D, 0x32: break  // the clock follows the host; C and D are read-only
            case 0x0A: s.ram[0x0A] = byte & 0x7F  // UIP is read-only
            default: s.ram[Int(s.index)] = byte
            }
        }
    }

    public var savedState: SavedState { state.withLock { $0 } }

    public func restore(_ saved: SavedState) throws(DeviceStateError) {
        guard saved.ram.count == 128, saved.index < 128 else {
            throw DeviceStateError(device: name, "\(saved.ram.count) bytes of CMOS RAM (128 expected), index \(saved.index)")
        }
        state.withLock { $0 = saved }
    }

    /// The time and date registers (seconds … year, century at 0x32) in the mode register B sets.
    private func timeRegister(_ index: UInt8, mode: UInt8) -> UInt8? {
        let field: Int
        var t = time_t(now())
        var parts = tm()
        guard gmtime_r(&t, &parts) != nil else { return nil }
        switch index {
        case 0x00: field = Int(parts.tm_sec)
        case 0x02: field = Int(parts.tm_min)
        case 0x04:
            let hour = Int(parts.tm_hour)
            if mode & 0x02 != 0 { field = hour } else {
                let twelve = hour % 12 == 0 ? 12 : hour % 12
                return encode(twelve, mode) | (hour >= 12 ? 0x80 : 0)
            }
        case 0x06: field = Int(parts.tm_wday) + 1
        case 0x07: field = Int(parts.tm_mday)
        case 0x08: field = Int(parts.tm_mon) + 1
        case 0x09: field = Int(parts.tm_year) % 100
        case 0x32: field = (Int(parts.tm_year) + 1900) / 100
        default: return nil
        }
        return encode(field, mode)
    }

    private func encode(_ v: Int, _ mode: UInt8) -> UInt8 {
        mode & 0x04 != 0 ? UInt8(v) : UInt8((v / 10) << 4 | v % 10)
    }
}
