import Logging

extension Logger {
    /// A logger that drops everything (what tests and library callers get by default).
    public static let silent = Logger(label: "swiftvisor.silent") { _ in SwiftLogNoOpLogHandler() }
}
