/// The translator's blocks by guest-physical address: open addressing with linear probing
/// on a multiplicative hash. A restored or booting guest looks blocks up and adds them by
/// the thousand, where a `Dictionary` spends its time hashing (SipHash) and resizing.
struct BlockTable {
    private struct Slot {
        var key: UInt64
        var block: BlockTranslator.Block
    }
    /// No guest-physical address: RAM is far below 2^64.
    private static let emptyKey = UInt64.max
    private var slots: UnsafeMutablePointer<Slot>
    private var mask: Int
    private(set) var count = 0

    init(capacity: Int = 1024) {
        precondition(capacity > 0 && capacity & (capacity - 1) == 0, "a power of two")
        slots = Self.emptySlots(capacity)
        mask = capacity - 1
    }

    /// Frees the table (the owning translator's deinit).
    func deallocate() { slots.deallocate() }

    private static func emptySlots(_ n: Int) -> UnsafeMutablePointer<Slot> {
        let s = UnsafeMutablePointer<Slot>.allocate(capacity: n)
        s.initialize(repeating: Slot(key: emptyKey, block: .init(rip: 0, gen: 0, entry: 0, chainedEntry: 0)), count: n)
        return s
    }

    private func home(_ key: UInt64) -> Int {
        Int(truncatingIfNeeded: (key &* 0x9E37_79B9_7F4A_7C15) >> 32) & mask
    }

    subscript(gpa: UInt64) -> BlockTranslator.Block? {
        get {
            var i = home(gpa)
            while true {
                let k = slots[i].key
                if k == gpa { return slots[i].block }
                if k == Self.emptyKey { return nil }
                i = (i + 1) & mask
            }
        }
        set {
            // Blocks are replaced, never removed one by one (`removeAll` empties the table).
            guard let block = newValue else { return }
            var i = home(gpa)
            while true {
                let k = slots[i].key
                if k == gpa { slots[i].block = block; return }
                if k == Self.emptyKey { break }
                i = (i + 1) & mask
            }
            slots[i] = Slot(key: gpa, block: block)
            count += 1
            if count * 2 > mask + 1 { grow() }
        }
    }

    mutating func removeAll() {
        slots.update(repeating: Slot(key: Self.emptyKey, block: .init(rip: 0, gen: 0, entry: 0, chainedEntry: 0)), count: mask + 1)
        count = 0
    }

    private mutating func grow() {
        let old = slots, oldCapacity = mask + 1
        slots = Self.emptySlots(oldCapacity * 2)
        mask = oldCapacity * 2 - 1
        count = 0
        for i in 0..<oldCapacity where old[i].key != Self.emptyKey { self[old[i].key] = old[i].block }
        old.deallocate()
    }
}
