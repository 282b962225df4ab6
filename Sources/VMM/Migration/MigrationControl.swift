import FoundationEssentials

/// One line a `PUT /migrate` request is answered with on the operator API: progress lines
/// while it runs, then one final line with `ok` and the report or the error.
public struct MigrationControlLine: Codable, Sendable {
    public var ok: Bool?
    public var progress: MigrationProgress?
    public var report: MigrationReport?
    public var error: String?

    public init(ok: Bool? = nil, progress: MigrationProgress? = nil, report: MigrationReport? = nil, error: String? = nil) {
        self.ok = ok; self.progress = progress; self.report = report; self.error = error
    }

    /// True for the last line of an answer.
    public var isFinal: Bool { ok != nil }
}
