import Lab

extension LabProgress {
    /// A lab's progress line, redrawn in place on standard error when that is a terminal;
    /// nothing when it is not, nor with --json (a script reads that output).
    static func onTerminal(_ name: String, report: LabReportOptions) -> LabProgress {
        guard !report.json else { return .silent }
        return LabProgress(name) { line in printError(line ?? "", newline: false) }
    }
}
