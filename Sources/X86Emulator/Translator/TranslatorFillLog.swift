/// The translator-cache slots filled since the last flush. Guests flush often — every CPL
/// change and CR3 write, several per system call — and a restored or freshly booted guest
/// has filled few slots in between, so a flush rewrites those instead of all 6,144 (TLB,
/// jump cache, interpreted-RIP table). Past `capacity` fills the next flush is a full one.
struct TranslatorFillLog {
    enum Table: UInt32 { case tlb = 0, jumpCache = 1, interpreted = 2 }

    static let capacity = 512
    private let slots: UnsafeMutablePointer<UInt32>
    private(set) var count = 0
    /// Too many fills to list (or the tables' contents are unknown): flush everything.
    private(set) var overflowed = true

    init() { slots = .allocate(capacity: Self.capacity) }

    /// Frees the list (the owning CPU's deinit).
    func deallocate() { slots.deallocate() }

    mutating func note(_ table: Table, _ index: Int) {
        guard !overflowed else { return }
        guard count < Self.capacity else { overflowed = true; return }
        slots[count] = table.rawValue << 24 | UInt32(truncatingIfNeeded: index)
        count += 1
    }

    /// Each listed slot (only when not overflowed).
    func forEach(_ body: (Table, Int) -> Void) {
        for k in 0..<count {
            let v = slots[k]
            body(Table(rawValue: v >> 24) ?? .tlb, Int(v & 0xFF_FFFF))
        }
    }

    mutating func reset() {
        count = 0
        overflowed = false
    }
}
