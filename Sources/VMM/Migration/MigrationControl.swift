import Dispatch
import FoundationEssentials
#if canImport(Glibc)
import Glibc
#endif

/// One line a `migrate` request answers with on the control socket: progress lines while it
/// runs, then one final line with `ok` and the report or the error.
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

/// The `migrate` request of a control channel, independent of the channel itself:
/// `migrate ADDRESS [postcopy] [auto-converge] [resume] [max-downtime-ms=N] [max-rounds=N] [timeout-s=N]`.
public enum MigrationControl {
    public static let usage = "migrate tcp:HOST:PORT|unix:PATH [postcopy] [auto-converge] [resume] [max-downtime-ms=N] [max-rounds=N] [timeout-s=N]"

    /// Parses the request's words (after "migrate").
    public static func parse(_ words: [String]) throws(MigrationError) -> (MigrationAddress, MigrationOptions) {
        guard let first = words.first else { throw .badAddress("") }
        let address = try MigrationAddress(parsing: first)
        var options = MigrationOptions()
        for word in words.dropFirst() {
            if word == "postcopy" { options.postcopy = true; continue }
            if word == "auto-converge" { options.autoConverge = true; continue }
            if word == "resume" { options.resume = true; continue }
            let parts = word.split(separator: "=", maxSplits: 1).map(String.init)
            guard parts.count == 2, let value = Double(parts[1]) else { throw .notMigratable("bad option '\(word)'; usage: \(usage)") }
            switch parts[0] {
            case "max-downtime-ms": try options.setMaxDowntime(milliseconds: value)
            case "max-rounds":
                guard let n = Int(exactly: value) else { throw .notMigratable("max-rounds must be a whole number") }
                try options.setMaxRounds(n)
            case "timeout-s": try options.setTimeout(seconds: value)
            default: throw .notMigratable("unknown option '\(parts[0])'; usage: \(usage)")
            }
        }
        return (address, options)
    }

    /// Runs the request against `machine`, handing each answer line (JSON, no newline) to `emit`.
    public static func serve(_ words: [String], machine: Machine, emit: @escaping (String) -> Void) {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        func line(_ l: MigrationControlLine) {
            guard let data = try? encoder.encode(l) else { return }
            emit(String(decoding: data, as: UTF8.self))
        }
        do {
            let (address, options) = try parse(words)
            let report = try machine.migrate(to: address, options: options) { line(MigrationControlLine(progress: $0)) }
            line(MigrationControlLine(ok: true, report: report))
        } catch {
            line(MigrationControlLine(ok: false, error: "\(error)"))
        }
    }
}

extension ControlServer {
    /// Sends `command` and hands each answer line to `onLine` as it arrives (a `migrate`
    /// request answers with progress lines before its final one).
    public static func sendStreaming(_ command: String, to path: String, onLine: (String) -> Void) throws {
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw ControlError.socketFailed(path: path, operation: "socket", errno: errno) }
        defer { Glibc.close(fd) }
        var addr = try address(path)
        let rc = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard rc == 0 else { throw ControlError.socketFailed(path: path, operation: "connect", errno: errno) }
        let request = command + "\n"
        _ = request.utf8CString.withUnsafeBufferPointer { write(fd, $0.baseAddress, $0.count - 1) }
        var pending: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 4096)
        while true {
            let n = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { break }
            pending += buffer[0..<n]
            while let newline = pending.firstIndex(of: UInt8(ascii: "\n")) {
                onLine(String(decoding: pending[..<newline], as: UTF8.self))
                pending.removeSubrange(...newline)
            }
        }
        if !pending.isEmpty { onLine(String(decoding: pending, as: UTF8.self)) }
    }
}
