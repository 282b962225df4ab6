import Foundation
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
        func ok(_ fields: [String: Any] = [:]) -> String { Self.json(["ok": true].merging(fields) { a, _ in a }) }
        func fail(_ message: String) -> String { Self.json(["ok": false, "error": message]) }
        switch words.first {
        case "snapshot":
            guard words.count >= 2 else { return fail("usage: snapshot PATH [NOTE]") }
            do {
                let r = try machine.snapshot(to: words[1], note: words.dropFirst(2).joined(separator: " "))
                return ok(["path": r.path, "pause_seconds": r.pauseSeconds, "total_seconds": r.totalSeconds,
                           "cow_faults": r.copyOnWriteFaults, "bytes_copied": r.bytesCopied, "file_bytes": r.fileBytes,
                           "mechanism": r.mechanism])
            } catch {
                return fail("\(error)")
            }
        case "balloon":
            guard let balloon = machine.balloon else { return fail("this VM has no balloon (run it with --balloon)") }
            if words.count >= 2 {
                guard let pages = UInt32(words[1]) else { return fail("usage: balloon PAGES (4 KiB pages, a whole number)") }
                balloon.setTarget(pages: pages)
            }
            return ok(["target_pages": balloon.targetPages, "actual_pages": balloon.actualPages,
                       "host_bytes": machine.memory.allocatedBytes])
        case "pause": machine.pause(); return ok()
        case "resume": machine.resume(); return ok()
        case "status":
            return ok(["engine": machine.engine.name, "paused": machine.isPaused, "memory": machine.memory.size,
                       "vcpus": machine.configuration.vcpuCount])
        case "stop": machine.stop(); return ok()
        default: return fail("unknown command '\(words.first ?? "")' (snapshot PATH [NOTE], balloon [PAGES], migrate ADDRESS, pause, resume, status, stop)")
        }
    }

    static func json(_ object: [String: Any]) -> String {
        guard let data = try? JSONSerialization.data(withJSONObject: object, options: [.sortedKeys]) else { return "{\"ok\":false}" }
        return String(decoding: data, as: UTF8.self)
    }

    /// Sends one command to the control socket at `path` and returns the decoded reply.
    public static func send(_ command: String, to path: String) throws -> [String: Any] {
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw ControlError.socketFailed(path: path, operation: "socket", errno: errno) }
        defer { Glibc.close(fd) }
        var addr = try address(path)
        let rc = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard rc == 0 else { throw ControlError.socketFailed(path: path, operation: "connect", errno: errno) }
        let line = command + "\n"
        _ = line.utf8CString.withUnsafeBufferPointer { write(fd, $0.baseAddress, $0.count - 1) }
        var reply: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 4096)
        while true {
            let n = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { break }
            reply += buffer[0..<n]
        }
        guard let object = try? JSONSerialization.jsonObject(with: Data(reply)) as? [String: Any] else {
            throw ControlError.badReply(String(decoding: reply, as: UTF8.self))
        }
        return object
    }
}
