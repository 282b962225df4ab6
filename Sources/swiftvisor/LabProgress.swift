import VirtCore

/// A long lab's progress on a terminal: "lab dedup: 5/14 (p=0.05, policy), about 40 s left",
/// redrawn in place on standard error; nothing when standard error is not a terminal.
struct LabProgress {
    let name: String
    private let started = monotonicNanoseconds()

    init(_ name: String) { self.name = name }

    /// Before step `done` of `total` (`next` says what runs now); `next == nil` clears the line.
    func update(_ done: Int, _ total: Int, _ next: String?) {
        guard let next else { printError("", newline: false); return }
        printError("\(name): \(done + 1)/\(total) (\(next))" + Self.estimate(done: done, total: total, elapsedSeconds: elapsed), newline: false)
    }

    private var elapsed: Double { Double(monotonicNanoseconds() - started) / 1e9 }

    /// ", about N s left" from the mean time per finished step; "" before the first step ends.
    static func estimate(done: Int, total: Int, elapsedSeconds: Double) -> String {
        guard done > 0, total > done else { return "" }
        let left = elapsedSeconds / Double(done) * Double(total - done)
        return left >= 90 ? ", about \(Int((left / 60).rounded())) min left" : ", about \(Int(left.rounded(.up))) s left"
    }
}
