import Synchronization

/// Guest pages the host wrote through `GuestMemory` (device DMA, the VMM) while logging is
/// on. An engine's dirty log sees only its vCPUs' writes (KVM's log and the software
/// engine's second-level dirty flags both miss writes made through the host mapping), so a
/// service that must see every change — live migration — takes the union of the two.
public final class HostWriteLog: Sendable {
    public let pageCount: Int
    private let enabled = Atomic<Bool>(false)
    // SAFETY: allocated once with `pageCount` bits, freed in deinit; every access is atomic.
    nonisolated(unsafe) private let words: UnsafeMutablePointer<Atomic<UInt64>>
    private let wordCount: Int

    init(pageCount: Int) {
        self.pageCount = pageCount
        wordCount = max(1, (pageCount + 63) / 64)
        words = .allocate(capacity: wordCount)
        for i in 0..<wordCount { (words + i).initialize(to: Atomic(0)) }
    }

    deinit {
        _ = words.deinitialize(count: wordCount)
        words.deallocate()
    }

    /// Starts (clearing the log) or stops logging.
    public func setEnabled(_ on: Bool) {
        if on { _ = collect() }
        enabled.store(on, ordering: .releasing)
    }

    /// Marks the pages of `[gpa, gpa+length)` (already bounds-checked) when logging is on.
    @inline(__always)
    func note(_ gpa: UInt64, _ length: Int) {
        guard enabled.load(ordering: .relaxed), length > 0 else { return }
        var page = Int(gpa >> 12)
        let last = Int((gpa + UInt64(length) - 1) >> 12)
        while page <= last {
            words[page >> 6].bitwiseOr(1 << UInt64(page & 63), ordering: .relaxed)
            page += 1
        }
    }

    /// The pages written since the last collection, clearing them (atomically per word, so
    /// a write racing with the collection is in this bitmap or the next).
    public func collect() -> DirtyBitmap {
        var bitmap = DirtyBitmap(pageCount: pageCount)
        bitmap.withUnsafeMutableWords { out in
            for i in 0..<min(out.count, wordCount) { out[i] = words[i].exchange(0, ordering: .acquiringAndReleasing) }
        }
        return bitmap
    }
}
