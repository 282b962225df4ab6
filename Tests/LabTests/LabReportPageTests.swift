import Foundation
import TestSupport
import Testing
@testable import Lab
import VMM

/// `lab report` from real lab results: the dedup and balloon labs run (small), write their
/// JSON as the CLI does, and the page shows each scenario's table and chart.
@Suite struct LabReportPageTests {
    @Test func reportShowsTablesChartsNegativesAndTheBreakEven() throws {
        let dir = NSTemporaryDirectory() + "swiftvisor-lab-report-\(getpid())"
        defer { try? FileManager.default.removeItem(atPath: dir) }
        var dedup = DedupLab(engine: .software)
        dedup.pages = 64
        dedup.writeProbabilities = [0, 0.02, 0.2, 0.5]
        let dedupResult = try dedup.run()
        _ = try writeLabOutputs(name: "dedup-software", directory: dir, result: dedupResult, chart: DedupLab.chart(dedupResult))
        var balloon = BalloonLab(engine: .software)
        balloon.datasetPages = 512
        balloon.accesses = 20_000
        balloon.cacheFractions = [0.5, 0.25]
        let balloonResult = try balloon.run()
        _ = try writeLabOutputs(name: "balloon-software", directory: dir, result: balloonResult, chart: BalloonLab.chart(balloonResult))
        // A file of another lab that is not a result of either (another name) is ignored.
        try Data("{}".utf8).write(to: URL(fileURLWithPath: dir + "/dedupe-notes.json"))

        let (html, missing) = LabReportPage.html(from: dir)
        #expect(Set(missing.map(\.lab)) == Set(LabReportPage.scenarios.map(\.lab)).subtracting(["dedup", "balloon"]))
        #expect(html.hasPrefix("<!DOCTYPE html>"))
        #expect(!html.contains("http://") || !html.contains("src=\"http"))  // no external assets
        #expect(!html.contains("<script") && !html.contains("<link") && !html.contains("<img"))

        // Each reported scenario: its claim, its table (every column header) and its chart.
        let s8 = try #require(section("S8", of: html))
        let s7 = try #require(section("S7", of: html))
        for column in DedupLab.table(dedupResult).columns { #expect(s8.contains("<th>\(LabReportPage.escape(column))</th>")) }
        for column in BalloonLab.table(balloonResult).columns { #expect(s7.contains("<th>\(LabReportPage.escape(column))</th>")) }
        #expect(s8.contains("The claim.") && s8.contains("copy-on-write break"))
        #expect(s8.contains("<svg") && s7.contains("<svg") && s7.contains("miss rate (%)"))

        // The dedup chart shows the negative net benefits (not clamped to 0), the zero line
        // and both break-evens.
        let measured = dedupResult.rows.compactMap(\.netBenefitPerPage)
        #expect(measured.contains { $0 < 0 }, "p = 0.5 loses: \(measured)")
        for value in measured where value < 0 {
            #expect(s8.contains("data-y=\"\(value.significant(4))\""), "negative point \(value) drawn")
        }
        #expect(s8.contains("class=\"zero\""))
        #expect(s8.contains("class=\"marker\""))
        #expect(s8.contains("break-even, model: p = \(dedupResult.predictedBreakEven.fixed(3))"))
        #expect(s8.range(of: "class=\"y-tick\">−") != nil, "a negative tick on the y axis")

        // A scenario without results says which command makes them.
        let s1 = try #require(section("S1", of: html))
        #expect(s1.contains("No result yet: run <code>swiftvisor lab pio-vs-mmio"))
    }

    func section(_ id: String, of html: String) -> String? {
        guard let start = html.range(of: "<section id=\"\(id)\">") else { return nil }
        let end = html.range(of: "</section>", range: start.upperBound..<html.endIndex)?.upperBound ?? html.endIndex
        return String(html[start.lowerBound..<end])
    }
}
