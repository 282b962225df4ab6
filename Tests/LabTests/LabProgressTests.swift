import Testing
@testable import Lab

/// The progress line every long lab draws on a terminal: steps counted, the estimate from
/// the mean time of the finished steps (a clock injected, so the times are exact).
@Suite struct LabProgressTests {
    final class Recorder {
        var nanoseconds: UInt64 = 0
        var lines: [String?] = []
    }

    func progress(_ r: Recorder) -> LabProgress {
        LabProgress("lab test", now: { r.nanoseconds }, sink: { r.lines.append($0) })
    }

    @Test func theEstimateIsTheMeanFinishedStepTimeTimesTheStepsLeft() {
        let r = Recorder()
        let p = progress(r)
        r.nanoseconds = 5_000_000_000  // the clock's origin does not matter
        p.begin(steps: 4)
        p.step("first")
        r.nanoseconds += 2_000_000_000
        p.step("second")
        r.nanoseconds += 4_000_000_000  // mean now 3 s, two steps left
        p.step("third")
        r.nanoseconds += 100_000_000
        p.step("fourth")
        p.finish()
        #expect(r.lines == [
            "lab test: 1/4 (first)",
            "lab test: 2/4 (second), about 6 s left",
            "lab test: 3/4 (third), about 6 s left",
            "lab test: 4/4 (fourth), about 3 s left",
            nil,
        ])
    }

    @Test func longEstimatesAreInMinutesAndPartSecondsRoundUp() {
        #expect(LabProgress.estimate(done: 1, total: 3, elapsedSeconds: 60) == ", about 2 min left")
        #expect(LabProgress.estimate(done: 2, total: 3, elapsedSeconds: 0.2) == ", about 1 s left")
        #expect(LabProgress.estimate(done: 3, total: 4, elapsedSeconds: 267) == ", about 89 s left")
        #expect(LabProgress.estimate(done: 0, total: 4, elapsedSeconds: 10) == "")
        #expect(LabProgress.estimate(done: 4, total: 4, elapsedSeconds: 10) == "")
    }

    @Test func beginStartsTheCountAndTheClockAgain() {
        let r = Recorder()
        let p = progress(r)
        p.begin(steps: 2)
        p.step("a")
        r.nanoseconds += 1_000_000_000
        p.step("b")
        p.begin(steps: 3)
        r.nanoseconds += 50_000_000_000
        p.step("c")
        r.nanoseconds += 1_000_000_000
        p.step("d")
        #expect(r.lines.suffix(2) == ["lab test: 1/3 (c)", "lab test: 2/3 (d), about 2 s left"])
    }

    /// A lab reports a step per run, in order, and clears the line at the end.
    @Test func aLabReportsEachRunAsAStep() throws {
        let r = Recorder()
        var lab = PioVsMmioLab(engine: .software)
        lab.reads = 2000
        lab.writes = 10
        _ = try lab.run(progress: LabProgress("lab test", sink: { r.lines.append($0) }))  // the real clock
        try #require(r.lines.count == 3, "\(r.lines)")
        #expect(r.lines[0] == "lab test: 1/2 (port I/O)")
        #expect(r.lines[1]?.hasPrefix("lab test: 2/2 (shared page), about ") == true, "\(r.lines)")
        #expect(r.lines[2] == nil)
    }
}
