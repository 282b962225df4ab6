/// An MSI-X capability and its table (PCI Local Bus 3.0 §6.8.2): each vector a message
/// address, data and a mask bit; a pending bit array for messages raised while masked.
public struct MSIX: Sendable, Equatable {
    public static let capabilityID: UInt8 = 0x11
    public static let enableBit: UInt16 = 1 << 15, functionMaskBit: UInt16 = 1 << 14
    public static let entryBytes = 16
    /// The PBA follows the table in the same BAR, at this offset.
    public static let pbaOffset: UInt64 = 0x800

    /// Offset of the capability in configuration space.
    public let capabilityOffset: Int
    public let vectors: Int
    public let bar: Int
    /// Address, upper address, data, vector control (bit 0: masked) per vector.
    private var table: [UInt32]
    public private(set) var pending: [Bool]

    /// Adds the capability to `config`, its table at offset 0 of BAR `bar` and the PBA at
    /// `pbaOffset`. Every vector starts masked, as the spec requires.
    public init(vectors: Int, bar: Int, in config: inout PCIConfigSpace) {
        precondition(vectors >= 1 && vectors <= 128, "1–128 vectors (the table must end before the PBA)")
        let control = UInt16(vectors - 1)
        let tableOffsetBIR = UInt32(bar)
        let pbaOffsetBIR = UInt32(Self.pbaOffset) | UInt32(bar)
        var body: [UInt8] = [UInt8(control & 0xFF), UInt8(control >> 8)]
        for v in [tableOffsetBIR, pbaOffsetBIR] { for i in 0..<4 { body.append(UInt8(truncatingIfNeeded: v >> (8 * UInt32(i)))) } }
        capabilityOffset = config.addCapability(id: Self.capabilityID, body: body, mask: [0x00, 0xC0])
        self.vectors = vectors
        self.bar = bar
        table = (0..<vectors).flatMap { _ in [UInt32(0), 0, 0, 1] }
        pending = Array(repeating: false, count: vectors)
    }

    /// The message control register (enable, function mask) as `config` holds it.
    public func control(_ config: PCIConfigSpace) -> UInt16 { config.read16(capabilityOffset + 2) }
    public func isEnabled(_ config: PCIConfigSpace) -> Bool { control(config) & Self.enableBit != 0 }
    func isMasked(_ vector: Int, control: UInt16) -> Bool {
        control & Self.functionMaskBit != 0 || table[vector * 4 + 3] & 1 != 0
    }
    /// True when the capability's registers lie in a configuration write at `[at, at+size)`.
    public func covers(_ at: Int, size: Int) -> Bool { at < capabilityOffset + 4 && capabilityOffset + 2 < at + size }

    /// A message to deliver: the interrupt's address and data.
    public struct Message: Equatable, Sendable {
        public var address: UInt64
        public var data: UInt32
        /// x86: the vector is the data's low byte.
        public var vector: UInt8 { UInt8(truncatingIfNeeded: data) }
    }

    private func message(_ v: Int) -> Message {
        Message(address: UInt64(table[v * 4 + 1]) << 32 | UInt64(table[v * 4]), data: table[v * 4 + 2])
    }

    /// The device raises `vector`: the message to send now, or nil (MSI-X off, or masked:
    /// then the pending bit is set and the message goes when the vector is unmasked).
    public mutating func signal(_ vector: Int, config: PCIConfigSpace) -> Message? {
        signal(vector, control: control(config))
    }

    /// `signal(_:config:)` for a device that keeps the message control register it last
    /// saw (so raising an interrupt needs no copy of configuration space).
    public mutating func signal(_ vector: Int, control: UInt16) -> Message? {
        guard vector >= 0, vector < vectors, control & Self.enableBit != 0 else { return nil }
        if isMasked(vector, control: control) {
            pending[vector] = true
            return nil
        }
        return message(vector)
    }

    /// Messages that became deliverable (pending and now unmasked); clears their pending bits.
    /// Call after a table write or a change of the message control register.
    public mutating func releasePending(config: PCIConfigSpace) -> [Message] {
        releasePending(control: control(config))
    }

    public mutating func releasePending(control: UInt16) -> [Message] {
        guard control & Self.enableBit != 0 else { return [] }
        var out: [Message] = []
        for v in 0..<vectors where pending[v] && !isMasked(v, control: control) {
            pending[v] = false
            out.append(message(v))
        }
        return out
    }

    /// A read in the BAR: the table (dwords) or the PBA.
    public func read(offset: UInt64, size: UInt8) -> UInt64 {
        if offset >= Self.pbaOffset {
            let bit = Int(offset - Self.pbaOffset) * 8
            var v: UInt64 = 0
            for i in 0..<Int(size) * 8 where bit + i < vectors && pending[bit + i] { v |= 1 << UInt64(i) }
            return v
        }
        let index = Int(offset / 4)
        guard index < table.count else { return 0 }
        if size == 8, index + 1 < table.count { return UInt64(table[index]) | UInt64(table[index + 1]) << 32 }
        return UInt64(table[index])
    }

    /// A write in the BAR: the table only (the PBA is read-only). Dword or qword.
    public mutating func write(offset: UInt64, size: UInt8, value: UInt64) {
        guard offset < Self.pbaOffset, offset % 4 == 0 else { return }
        let index = Int(offset / 4)
        guard index < table.count else { return }
        table[index] = index % 4 == 3 ? UInt32(truncatingIfNeeded: value) & 1 : UInt32(truncatingIfNeeded: value)
        if size == 8, index + 1 < table.count {
            table[index + 1] = (index + 1) % 4 == 3 ? UInt32(truncatingIfNeeded: value >> 32) & 1 : UInt32(truncatingIfNeeded: value >> 32)
        }
    }

    /// The table and pending bits, for a snapshot (the enable and function-mask bits live
    /// in configuration space).
    public struct SavedState: Codable, Sendable, Equatable {
        public var table: [UInt32]
        public var pending: [Bool]
    }

    public var savedState: SavedState { SavedState(table: table, pending: pending) }

    /// Takes a saved table of the same size back (vector control keeps only its mask bit).
    public mutating func restore(_ saved: SavedState) throws(DeviceStateError) {
        guard saved.table.count == table.count, saved.pending.count == vectors else {
            throw DeviceStateError(device: "MSI-X", "\(saved.table.count / 4) vectors saved, \(vectors) here")
        }
        table = saved.table.enumerated().map { $0.offset % 4 == 3 ? $0.element & 1 : $0.element }
        pending = saved.pending
    }
}
