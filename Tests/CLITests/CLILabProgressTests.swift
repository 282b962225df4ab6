import Foundation
import TestSupport
import Testing

/// A long lab's progress line ("lab …: 2/2 (…), about N s left", redrawn in place) is drawn
/// only when standard error is a terminal: piped output and --json carry no control sequences.
@Suite struct CLILabProgressTests {
    static let labArguments = ["lab", "pio-vs-mmio", "--engine", "software", "--reads", "2000", "--writes", "10"]

    static func hasControlSequences(_ text: String) -> Bool { text.contains("\r") || text.contains("\u{1B}[") }

    @Test(arguments: [false, true])
    func pipedOutputCarriesNoProgressLine(json: Bool) throws {
        let dir = NSTemporaryDirectory() + "swiftvisor-cli-progress-\(getpid())-\(json)"
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let r = try swiftvisor(Self.labArguments + ["--output", dir] + (json ? ["--json"] : []))
        #expect(r.status == 0, "\(r.stderr)")
        #expect(!Self.hasControlSequences(r.stdout) && !Self.hasControlSequences(r.stderr), "\(r.stdout.debugDescription) \(r.stderr.debugDescription)")
        #expect(!r.stderr.contains("1/2"))
    }

    /// Under a pseudo-terminal (util-linux `script`) the line appears, with its estimate
    /// once a step has finished, and is cleared before the table.
    @Test(.enabled(if: FileManager.default.isExecutableFile(atPath: "/usr/bin/script"),
                   "needs util-linux /usr/bin/script for a pseudo-terminal"))
    func onATerminalTheLineCountsStepsWithAnEstimate() throws {
        let script = "/usr/bin/script"
        let dir = NSTemporaryDirectory() + "swiftvisor-cli-progress-tty-\(getpid())"
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let command = ([swiftvisorPath] + Self.labArguments + ["--output", dir]).map { "'\($0)'" }.joined(separator: " ")
        let (status, text) = try runToCompletion(script, ["-qec", command, "/dev/null"])
        #expect(status == 0, "\(text)")
        #expect(text.contains("\r\u{1B}[Klab pio-vs-mmio: 1/2 (port I/O)"), "\(text.debugDescription)")
        #expect(text.contains("\r\u{1B}[Klab pio-vs-mmio: 2/2 (shared page), about "), "\(text.debugDescription)")
        // Cleared at the end: what follows the last redraw is the table, not a progress line.
        #expect(text.components(separatedBy: "\r\u{1B}[K").count >= 4)
        #expect(!(text.components(separatedBy: "\r\u{1B}[K").last ?? "").hasPrefix("lab pio-vs-mmio: "), "\(text.debugDescription)")
    }
}
