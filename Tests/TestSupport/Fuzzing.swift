#if canImport(Glibc)
import Glibc
#endif

/// How long the seeded fuzz loops run. `swift test` runs each a few seconds' worth;
/// `SWIFTVISOR_FUZZ_ITERATIONS=1000000 swift test --filter Fuzz` runs them long, and
/// `SWIFTVISOR_FUZZ_SEED=n` starts them from other inputs than the committed seeds.
public enum FuzzBudget {
    /// `SWIFTVISOR_FUZZ_ITERATIONS` when it is larger, else `standard` (the bounded run of
    /// `swift test`, enough for each loop's check that it reached every kind of outcome).
    public static func iterations(standard: Int) -> Int {
        max(standard, environment("SWIFTVISOR_FUZZ_ITERATIONS").flatMap { Int($0) } ?? 0)
    }

    /// `seed` mixed with `SWIFTVISOR_FUZZ_SEED` when that is set; a failing case names both.
    public static func seed(_ seed: UInt64) -> UInt64 {
        environment("SWIFTVISOR_FUZZ_SEED").flatMap { UInt64($0) }.map { seed ^ $0 &* 0x9E37_79B9_7F4A_7C15 } ?? seed
    }

    private static func environment(_ name: String) -> String? {
        getenv(name).map { String(cString: $0) }
    }
}

/// Structure-aware mutations shared by the fuzz loops: each keeps most of a valid input and
/// damages it the way a corrupt file or a hostile guest would.
public enum Mutation: CaseIterable, Sendable {
    case truncate, flipBit, boundaryByte, boundaryWord, randomBytes, duplicateRange

    /// Bytes that sit on encoding and range boundaries.
    public static let boundaryBytes: [UInt8] = [0x00, 0x01, 0x7F, 0x80, 0xFE, 0xFF]
    /// Values that sit on the edges of lengths, counts and offsets.
    public static let boundaryValues: [UInt64] = [0, 1, 2, 0x7F, 0x80, 0xFF, 0x100, 0xFFF, 0x1000, 0x7FFF, 0x8000, 0xFFFF, 0x1_0000,
                                                   0x7FFF_FFFF, 0x8000_0000, 0xFFFF_FFFF, 0x1_0000_0000, UInt64(Int64.max), 1 << 63, ~0]

    /// A boundary value, or (a third of the time) a random one.
    public static func boundaryValue(_ g: inout SplitMix64) -> UInt64 {
        g.next() % 3 == 0 ? g.next() : boundaryValues[Int(g.next() % UInt64(boundaryValues.count))]
    }

    /// Applies this mutation to `bytes` somewhere in `range` (the whole input when nil).
    public func apply(to bytes: inout [UInt8], in range: Range<Int>? = nil, _ g: inout SplitMix64) {
        let r = range ?? 0..<bytes.count
        guard !r.isEmpty else { return }
        let at = r.lowerBound + Int(g.next() % UInt64(r.count))
        switch self {
        case .truncate:
            bytes.removeSubrange(at..<bytes.count)
        case .flipBit:
            bytes[at] ^= 1 << UInt8(g.next() % 8)
        case .boundaryByte:
            bytes[at] = Self.boundaryBytes[Int(g.next() % UInt64(Self.boundaryBytes.count))]
        case .boundaryWord:
            let width = [2, 4, 8][Int(g.next() % 3)]
            let value = Self.boundaryValue(&g)
            for i in 0..<width where at + i < r.upperBound { bytes[at + i] = UInt8(truncatingIfNeeded: value >> (8 * UInt64(i))) }
        case .randomBytes:
            for i in at..<min(r.upperBound, at + 1 + Int(g.next() % 16)) { bytes[i] = UInt8(truncatingIfNeeded: g.next()) }
        case .duplicateRange:
            let count = min(r.upperBound - at, 1 + Int(g.next() % 16))
            bytes.insert(contentsOf: bytes[at..<at + count], at: at)
        }
    }

    public static func random(_ g: inout SplitMix64) -> Mutation { allCases[Int(g.next() % UInt64(allCases.count))] }
}
