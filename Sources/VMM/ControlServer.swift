import FoundationEssentials
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

public enum ControlError: Error, CustomStringConvertible {
    case socketFailed(path: String, operation: String, errno: Int32)
    case pathTooLong(String)
    case badReply(String)

    public var description: String {
        switch self {
        case let .socketFailed(path, op, err): return "control socket \(path): \(op) failed: \(String(cString: strerror(err)))"
        case let .pathTooLong(path): return "control socket path is too long (at most 107 bytes): \(path)"
        case let .badReply(text): return "unexpected reply from the VM: \(text)"
        }
    }
}

/// A running machine's control channel: a Unix stream socket taking one-line commands and
/// answering with one line of JSON (`{"ok":true,…}` or `{"ok":false,"error":"…"}`).
///
/// Commands: `snapshot PATH [NOTE…]` (copy-on-write snapshot while the guest runs),
/// `balloon PAGES` (set the balloon's target; `balloon` alone reports it), `pause`,
/// `resume`, `status`, `stop`, and `migrate ADDRESS …` (MigrationControl.swift; progress
/// lines, then the result).
// SAFETY: `thread` is set in init and joined in close() on the owner's thread; `stopping` is atomic.
public final class ControlServer: @unchecked Sendable {
    public let path: String
    private let machine: Machine
    private let listenFD: Int32
    private var thread: HostThread?
    private let stopping = Atomic<Bool>(false)

    public init(machine: Machine, path: String) throws {
        self.machine = machine
        self.path = path
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw ControlError.socketFailed(path: path, operation: "socket", errno: errno) }
        var addr = try Self.address(path)
        unlink(path)  // a stale socket from an earlier run
        let rc = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard rc == 0, listen(fd, 4) == 0 else {
            let err = errno
            Glibc.close(fd)
            throw ControlError.socketFailed(path: path, operation: "bind/listen", errno: err)
        }
        listenFD = fd
        thread = HostThread(name: "control") { [self] in serve() }
    }

    deinit { close() }

    /// Stops serving and removes the socket.
    public func close() {
        guard !stopping.exchange(true, ordering: .acquiringAndReleasing) else { return }
        shutdown(listenFD, Int32(SHUT_RDWR))
        Glibc.close(listenFD)
        thread?.join()
        unlink(path)
    }

    static func address(_ path: String) throws -> sockaddr_un {
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        guard bytes.count < MemoryLayout.size(ofValue: addr.sun_path) else { throw ControlError.pathTooLong(path) }
        withUnsafeMutableBytes(of: &addr.sun_path) { raw in
            raw.copyBytes(from: bytes)
            raw[bytes.count] = 0
        }
        return addr
    }

    private func serve() {
        while !stopping.load(ordering: .acquiring) {
            let client = accept(listenFD, nil, nil)
            if client < 0 {
                if errno == EINTR { continue }
                return
            }
            handle(client)
            Glibc.close(client)
        }
    }

    private func handle(_ fd: Int32) {
        var line: [UInt8] = []
        var byte: UInt8 = 0
        while line.count < 4096 {
            let n = read(fd, &byte, 1)
            if n < 0 && errno == EINTR { continue }
            if n <= 0 || byte == UInt8(ascii: "\n") { break }
            line.append(byte)
        }
        let command = String(decoding: line, as: UTF8.self)
        func send(_ text: String) {
            _ = (text + "\n").utf8CString.withUnsafeBufferPointer { write(fd, $0.baseAddress, $0.count - 1) }
        }
        let words = command.split(separator: " ", omittingEmptySubsequences: true).map(String.init)
        if words.first == "migrate" {  // answers with progress lines, then the result
            MigrationControl.serve(Array(words.dropFirst()), machine: machine, emit: send)
            return
        }
        send(respond(to: command))
    }

    func respond(to command: String) -> String {
        let words = command.split(separator: " ", omittingEmptySubsequences: true).map(String.init)
        func fail(_ message: String) -> String { ControlReply(ok: false, error: message).json }
        switch words.first {
        case "snapshot":
            guard words.count >= 2 else { return fail("usage: snapshot PATH [NOTE]") }
            do {
                let r = try machine.snapshot(to: words[1], note: words.dropFirst(2).joined(separator: " "))
                var reply = ControlReply(ok: true)
                reply.snapshot = .init(path: r.path, pauseSeconds: r.pauseSeconds, totalSeconds: r.totalSeconds,
                                       cowFaults: r.copyOnWriteFaults, bytesCopied: r.bytesCopied, fileBytes: r.fileBytes,
                                       mechanism: r.mechanism)
                return reply.json
            } catch {
                return fail("\(error)")
            }
        case "balloon":
            guard let balloon = machine.balloon else { return fail("this VM has no balloon (run it with --balloon)") }
            if words.count >= 2 {
                guard let pages = UInt32(words[1]) else { return fail("usage: balloon PAGES (4 KiB pages, a whole number)") }
                balloon.setTarget(pages: pages)
            }
            var reply = ControlReply(ok: true)
            reply.balloon = .init(targetPages: balloon.targetPages, actualPages: balloon.actualPages, hostBytes: machine.memory.allocatedBytes)
            return reply.json
        case "pause": machine.pause(); return ControlReply(ok: true).json
        case "resume": machine.resume(); return ControlReply(ok: true).json
        case "status":
            var reply = ControlReply(ok: true)
            reply.status = .init(engine: machine.engine.name, paused: machine.isPaused, memory: machine.memory.size,
                                 vcpus: machine.configuration.vcpuCount)
            return reply.json
        case "stop": machine.stop(); return ControlReply(ok: true).json
        default: return fail("unknown command '\(words.first ?? "")' (snapshot PATH [NOTE], balloon [PAGES], migrate ADDRESS, pause, resume, status, stop)")
        }
    }

    /// Sends one command to the control socket at `path` and returns the decoded reply.
    public static func send(_ command: String, to path: String) throws -> ControlReply {
        var lines: [String] = []
        try sendStreaming(command, to: path) { lines.append($0) }
        let reply = Array(lines.joined(separator: "\n").utf8)
        let decoder = JSONDecoder()
        decoder.keyDecodingStrategy = .convertFromSnakeCase
        guard let decoded = try? decoder.decode(ControlReply.self, from: Data(reply)) else {
            throw ControlError.badReply(String(decoding: reply, as: UTF8.self))
        }
        return decoded
    }
}

/// One reply of the control socket, as JSON on one line.
public struct ControlReply: Codable, Sendable, Equatable {
    public struct Snapshot: Codable, Sendable, Equatable {
        public var path: String
        public var pauseSeconds: Double
        public var totalSeconds: Double
        public var cowFaults: UInt64
        public var bytesCopied: UInt64
        public var fileBytes: UInt64
        public var mechanism: String
    }
    public struct Balloon: Codable, Sendable, Equatable {
        public var targetPages: UInt32
        public var actualPages: UInt32
        public var hostBytes: UInt64
    }
    public struct Status: Codable, Sendable, Equatable {
        public var engine: String
        public var paused: Bool
        public var memory: UInt64
        public var vcpus: Int
    }
    public var ok: Bool
    public var error: String?
    public var snapshot: Snapshot?
    public var balloon: Balloon?
    public var status: Status?

    public init(ok: Bool, error: String? = nil) { self.ok = ok; self.error = error }

    var json: String {
        let encoder = JSONEncoder()
        encoder.keyEncodingStrategy = .convertToSnakeCase
        encoder.outputFormatting = .sortedKeys
        guard let data = try? encoder.encode(self) else { return #"{"ok":false,"error":"reply could not be encoded"}"# }
        return String(decoding: data, as: UTF8.self)
    }
}
