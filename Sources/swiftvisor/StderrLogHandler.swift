import Logging
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// swift-log's backend for swiftvisor: one line per event on standard error,
/// `swiftvisor: LEVEL: message key=value …` (the level word only from warning down to trace,
/// so a notice reads like the tool's other lines). Bootstrapping it costs one closure; no
/// thread, no buffer.
struct StderrLogHandler: LogHandler {
    var metadata: Logger.Metadata = [:]
    var logLevel: Logger.Level
    private let label: String

    init(label: String, level: Logger.Level) {
        self.label = label
        self.logLevel = level
    }

    subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    func log(event: LogEvent) {
        var line = "swiftvisor: "
        switch event.level {
        case .notice, .info: break
        default: line += "\(event.level): "
        }
        line += "\(event.message)"
        let all = metadata.merging(event.metadata ?? [:]) { $1 }
        for (key, value) in all.sorted(by: { $0.key < $1.key }) { line += " \(key)=\(value)" }
        line += "\n"
        line.withUTF8 { buf in
            var off = 0
            while off < buf.count {
                let n = write(2, buf.baseAddress! + off, buf.count - off)
                if n < 0 { if errno == EINTR { continue }; return }
                off += n
            }
        }
    }

    private static let bootstrapped = Atomic<Bool>(false)

    /// Installs this handler at `level` for every logger of the process (once; later calls
    /// only matter for loggers made with `makeLogger`).
    static func bootstrap(level: Logger.Level) {
        guard !bootstrapped.exchange(true, ordering: .acquiringAndReleasing) else { return }
        LoggingSystem.bootstrap { label in StderrLogHandler(label: label, level: level) }
    }
}
