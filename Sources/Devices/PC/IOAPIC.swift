import Synchronization

/// The I/O APIC at 0xFEC00000 (IOREGSEL at 0x00, IOWIN at 0x10, EOI at 0x40): 24 input
/// pins, each with a redirection entry (vector, fixed/lowest-priority delivery, physical or
/// logical destination, polarity, edge or level trigger with remote IRR, mask). A pin's
/// level comes from `setLine`; edges and asserted levels go to the local APICs.
public final class IOAPIC: MMIODevice, Sendable {
    public static let base: UInt64 = 0xFEC0_0000
    public static let size: UInt64 = 0x1000
    public static let pins = 24
    public var name: String { "ioapic" }

    /// IOREGSEL, the ID, the redirection entries (with remote IRR) and the input levels.
    public struct SavedState: Codable, Sendable, Equatable {
        fileprivate var select: UInt32 = 0
        fileprivate var id: UInt32 = 0
        fileprivate var entries = [UInt64](repeating: 1 << 16, count: IOAPIC.pins)  // masked
        fileprivate var lines = [Bool](repeating: false, count: IOAPIC.pins)
    }
    private let state = Mutex(SavedState())
    private let apics: LocalAPICBank

    public init(apics: LocalAPICBank) {
        self.apics = apics
        apics.setLevelEOIHandler { [weak self] vector in self?.endOfInterrupt(vector: vector) }
    }

    public func mmioRead(offset: UInt64, size: UInt8) -> UInt64 {
        state.withLock { s -> UInt64 in
            switch offset {
            case 0x00: return UInt64(s.select)
            case 0x10:
                switch s.select {
                case 0x00: return UInt64(s.id << 24)
                case 0x01: return UInt64(0x11 | (UInt32(Self.pins - 1) << 16))  // version 0x11, 24 entries
                case 0x02: return UInt64(s.id << 24)
                case 0x10..<0x40:
                    let e = s.entries[Int(s.select - 0x10) / 2]
                    return s.select & 1 == 0 ? e & 0xFFFF_FFFF : e >> 32
                default: return 0
                }
            default: return 0
            }
        }
    }

    public func mmioWrite(offset: UInt64, size: UInt8, value: UInt64) {
        let v = UInt32(truncatingIfNeeded: value)
        switch offset {
        case 0x00: state.withLock { $0.select = v & 0xFF }
        case 0x10:
            let pin = state.withLock { s -> Int? in
                switch s.select {
                case 0x00: s.id = (v >> 24) & 0xF
                case 0x10..<0x40:
                    let k = Int(s.select - 0x10) / 2
                    var e = s.entries[k]
                    // Delivery status (12) and remote IRR (14) are read-only.
                    let writable: UInt64 = s.select & 1 == 0 ? 0xFFFF_FFFF & ~(UInt64(1) << 12 | UInt64(1) << 14) : 0xFFFF_FFFF_0000_0000
                    let shifted = s.select & 1 == 0 ? UInt64(v) : UInt64(v) << 32
                    e = (e & ~writable) | (shifted & writable)
                    s.entries[k] = e
                    return k
                default: break
                }
                return nil
            }
            // Unmasking an asserted level-triggered pin delivers it. (The local APICs' TMR
            // follows the interrupts they accept, not the routing: SDM Vol. 3A §10.8.4.)
            if let pin { service(pin) }
        case 0x40: endOfInterrupt(vector: UInt8(truncatingIfNeeded: v))
        default: break
        }
    }

    public var savedState: SavedState { state.withLock { $0 } }

    /// Restores `savedState` into a fresh I/O APIC whose devices have not driven a line yet.
    public func restore(_ saved: SavedState) throws(DeviceStateError) {
        guard saved.entries.count == Self.pins, saved.lines.count == Self.pins else {
            throw DeviceStateError(device: name, "\(saved.entries.count) redirection entries and \(saved.lines.count) lines (\(Self.pins) expected)")
        }
        state.withLock { $0 = saved }
    }

    /// Drives input `pin` (from a device or pc-testdev's port 0x2000 + pin).
    public func setLine(_ pin: Int, _ level: Bool) {
        guard pin >= 0, pin < Self.pins else { return }
        let edge = state.withLock { s -> Bool in
            let old = s.lines[pin]
            s.lines[pin] = level
            return !old && level
        }
        let levelTriggered = state.withLock { $0.entries[pin] & (1 << 15) != 0 }
        if levelTriggered ? level : edge { service(pin, edge: edge) }
    }

    /// Delivers `pin` if it should fire now: unmasked, and for a level-triggered pin asserted
    /// (active level) without a remote IRR pending.
    private func service(_ pin: Int, edge: Bool = false) {
        let target = state.withLock { s -> (UInt64)? in
            let e = s.entries[pin]
            guard e & (1 << 16) == 0 else { return nil }
            if e & (1 << 15) != 0 {
                let activeLow = e & (1 << 13) != 0
                guard s.lines[pin] != activeLow, e & (1 << 14) == 0 else { return nil }
                s.entries[pin] |= 1 << 14  // remote IRR until the EOI
            } else if !edge {
                return nil
            }
            return e
        }
        guard let e = target else { return }
        apics.deliverMessage(vector: UInt8(e & 0xFF), mode: UInt32((e >> 8) & 7), logical: e & (1 << 11) != 0,
                             destination: UInt32(e >> 56), level: e & (1 << 15) != 0)
    }

    /// EOI of `vector` (from a local APIC, for a level-triggered interrupt, or the EOI
    /// register): clears remote IRR of the entries with that vector; a pin still asserted fires again.
    private func endOfInterrupt(vector: UInt8) {
        let pins = state.withLock { s -> [Int] in
            var cleared: [Int] = []
            for k in 0..<Self.pins where s.entries[k] & 0xFF == UInt64(vector) && s.entries[k] & (1 << 14) != 0 {
                s.entries[k] &= ~(UInt64(1) << 14)
                cleared.append(k)
            }
            return cleared
        }
        for pin in pins { service(pin) }
    }
}
