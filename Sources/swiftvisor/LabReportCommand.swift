import ArgumentParser
import Lab

struct LabReportCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "report",
        abstract: "Write one static HTML page from the labs' JSON results: claims, models, tables and charts.",
        discussion: """
            Reads the <lab>.json and <lab>-<engine>.json files the labs wrote into --from (their \
            --output, default lab-results/). Per scenario the page gives the source text's claim, \
            the model the lab compares against, the measured table and its chart (inline SVG: the \
            page needs nothing else). A scenario without results names the command that makes them.
            """)

    @Option(name: .long, help: ArgumentHelp("Directory holding the labs' JSON results.", valueName: "dir"))
    var from = "lab-results"

    @Option(name: .long, help: ArgumentHelp("The HTML file to write.", valueName: "path"))
    var out = "lab-report.html"

    func run() throws {
        let (html, missing) = LabReportPage.html(from: from)
        do {
            try writeFile(out, html)
        } catch {
            printError("swiftvisor: error: cannot write \(out): \(error)")
            throw ExitCode(ToolStatus.failure)
        }
        let shown = LabReportPage.scenarios.count - missing.count
        print("wrote \(out): \(shown) of \(LabReportPage.scenarios.count) scenarios with results")
        for s in missing { print("  \(s.id) \(s.lab): no results in \(from); make them with: \(s.command) --output \(from)") }
    }
}
