import Foundation
import TestSupport
import Testing

/// `bench startup` as a user runs it: both figures per engine, in the table and the JSON.
@Suite struct CLIBenchStartupTests {
    @Test func printsTimeToFirstInstructionAndRSSOverhead() throws {
        let json = NSTemporaryDirectory() + "swiftvisor-startup-\(getpid()).json"
        defer { unlink(json) }
        let r = try swiftvisor(["bench", "startup", "--runs", "1", "--engine", "software", "--json", json])
        #expect(r.status == 0, "\(r.stderr)")
        #expect(r.stdout.contains("to 1st instruction") && r.stdout.contains("RSS overhead"))
        let obj = try #require(try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: json))) as? [String: Any])
        let row = try #require((obj["rows"] as? [[String: Any]])?.first)
        #expect(row["engine"] as? String == "software")
        // The guest ran (a first instruction after the spawn) and the VMM costs some memory.
        #expect((row["median_milliseconds_to_first_instruction"] as? Double ?? 0) > 0)
        #expect((row["median_peak_rss_overhead_mi_b"] as? Double ?? 0) > 0)
    }
}
