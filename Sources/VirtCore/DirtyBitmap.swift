/// One bit per 4 KiB guest page; the format KVM_GET_DIRTY_LOG fills in (64-bit words,
/// page *n* is bit `n % 64` of word `n / 64`).
public struct DirtyBitmap: Equatable, Sendable {
    public private(set) var words: [UInt64]
    public let pageCount: Int

    public init(pageCount: Int) {
        self.pageCount = pageCount
        self.words = [UInt64](repeating: 0, count: (pageCount + 63) / 64)
    }

    public init(pageCount: Int, words: [UInt64]) {
        precondition(words.count == (pageCount + 63) / 64, "bitmap word count does not match page count")
        self.pageCount = pageCount
        self.words = words
    }

    public subscript(page: Int) -> Bool {
        get { words[page >> 6] & (1 << UInt64(page & 63)) != 0 }
        set {
            if newValue { words[page >> 6] |= 1 << UInt64(page & 63) } else { words[page >> 6] &= ~(1 << UInt64(page & 63)) }
        }
    }

    public var dirtyCount: Int { words.reduce(0) { $0 + $1.nonzeroBitCount } }
    public var isEmpty: Bool { words.allSatisfy { $0 == 0 } }

    /// Dirty page numbers in ascending order.
    public var dirtyPages: [Int] {
        var pages: [Int] = []
        pages.reserveCapacity(dirtyCount)
        for (i, var w) in words.enumerated() {
            while w != 0 {
                pages.append(i * 64 + w.trailingZeroBitCount)
                w &= w - 1
            }
        }
        return pages
    }

    public mutating func formUnion(_ other: DirtyBitmap) {
        precondition(other.pageCount == pageCount, "bitmaps of different sizes")
        for i in words.indices { words[i] |= other.words[i] }
    }

    /// The pages this bitmap does not have (bits past `pageCount` stay clear).
    public var complement: DirtyBitmap {
        var result = DirtyBitmap(pageCount: pageCount, words: words.map { ~$0 })
        if pageCount % 64 != 0, !result.words.isEmpty {
            result.words[result.words.count - 1] &= (1 << UInt64(pageCount % 64)) - 1
        }
        return result
    }

    public mutating func clearAll() {
        for i in words.indices { words[i] = 0 }
    }

    /// Gives KVM (or another producer) the raw words to fill.
    public mutating func withUnsafeMutableWords<R>(_ body: (UnsafeMutableBufferPointer<UInt64>) throws -> R) rethrows -> R {
        try words.withUnsafeMutableBufferPointer { try body($0) }
    }
}
