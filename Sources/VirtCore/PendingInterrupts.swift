import Synchronization

/// External interrupt vectors waiting for delivery to one vCPU: a 256-bit set, as the IRR
/// of a local APIC. Devices post from any thread; the vCPU's thread takes the highest
/// vector (the highest-priority one, as x86 does) when the guest can accept it.
public final class PendingInterrupts: Sendable {
    private let w0 = Atomic<UInt64>(0), w1 = Atomic<UInt64>(0), w2 = Atomic<UInt64>(0), w3 = Atomic<UInt64>(0)

    public init() {}

    /// Marks `vector` pending. Posting a vector that is already pending merges with it.
    public func post(_ vector: UInt8) {
        _ = withWord(Int(vector >> 6)) { $0.bitwiseOr(1 << UInt64(vector & 63), ordering: .releasing) }
    }

    /// True when nothing waits.
    public var isEmpty: Bool {
        w0.load(ordering: .relaxed) | w1.load(ordering: .relaxed)
            | w2.load(ordering: .relaxed) | w3.load(ordering: .relaxed) == 0
    }

    /// Removes and returns the highest pending vector, or nil.
    public func takeHighest() -> UInt8? {
        for i in stride(from: 3, through: 0, by: -1) {
            var taken: UInt8?
            withWord(i) { w in
                var current = w.load(ordering: .acquiring)
                while current != 0 {
                    let bit = 63 - current.leadingZeroBitCount
                    let (exchanged, now) = w.weakCompareExchange(expected: current, desired: current & ~(1 << UInt64(bit)),
                                                                  ordering: .acquiringAndReleasing)
                    if exchanged { taken = UInt8(i * 64 + bit); return }
                    current = now
                }
            }
            if let taken { return taken }
        }
        return nil
    }

    /// Drops everything pending (vCPU reset, snapshot restore).
    public func clear() {
        for i in 0..<4 { withWord(i) { $0.store(0, ordering: .releasing) } }
    }

    @inline(__always)
    private func withWord<R>(_ i: Int, _ body: (borrowing Atomic<UInt64>) -> R) -> R {
        switch i {
        case 0: return body(w0)
        case 1: return body(w1)
        case 2: return body(w2)
        default: return body(w3)
        }
    }
}
