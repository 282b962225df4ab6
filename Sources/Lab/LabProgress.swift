import VirtCore

/// A lab's progress, step by step: "lab dedup: 5/14 (p=0.05, policy), about 40 s left".
/// A lab says how many steps it will run (`begin`), names each as it starts (`step`) and
/// ends with `finish`; every lab reports through this one type. The estimate is the mean
/// time of the steps finished so far times the steps left. Lines go to `sink` (nil: clear
/// the line); the CLI draws them in place on a terminal and drops them otherwise.
package final class LabProgress {
    package let name: String
    private let now: () -> UInt64
    private let sink: (String?) -> Void
    private var total = 0
    private var started = 0
    private var firstStepStarted: UInt64?

    /// `now` is a monotonic clock in nanoseconds (injected by tests).
    package init(_ name: String, now: @escaping () -> UInt64 = monotonicNanoseconds, sink: @escaping (String?) -> Void) {
        self.name = name
        self.now = now
        self.sink = sink
    }

    /// Reports nothing (a lab run from a test or another lab).
    package static var silent: LabProgress { LabProgress("", sink: { _ in }) }

    /// `steps` steps follow (counted before the first, so the estimate has a denominator).
    package func begin(steps: Int) {
        total = steps
        started = 0
        firstStepStarted = nil
    }

    /// The next step starts now; `what` says what it runs.
    package func step(_ what: String) {
        let t = now()
        if firstStepStarted == nil { firstStepStarted = t }
        let done = started
        started += 1
        let elapsed = Double(t - (firstStepStarted ?? t)) / 1e9
        sink("\(name): \(started)/\(max(total, started)) (\(what))" + Self.estimate(done: done, total: total, elapsedSeconds: elapsed))
    }

    /// The last step is over: the line is cleared.
    package func finish() { sink(nil) }

    /// ", about N s left" from the mean time per finished step (minutes from 90 s on); ""
    /// before the first step has finished or once none is left.
    package static func estimate(done: Int, total: Int, elapsedSeconds: Double) -> String {
        guard done > 0, total > done else { return "" }
        let left = elapsedSeconds / Double(done) * Double(total - done)
        return left >= 90 ? ", about \(Int((left / 60).rounded())) min left" : ", about \(Int(left.rounded(.up))) s left"
    }
}
