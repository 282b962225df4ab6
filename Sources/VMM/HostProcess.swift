import CHost
#if canImport(Glibc)
import Glibc
#endif

/// Runs a host program to completion (posix_spawn; Foundation's Process stays out of the tool).
public enum HostProcess {
    public struct Outcome: Sendable {
        /// The exit status, or 128 + signal when a signal ended it.
        public var status: Int32
        /// Standard output and standard error, interleaved.
        public var output: String
    }

    public enum Failure: Error, CustomStringConvertible {
        case spawnFailed(path: String, errno: Int32)
        public var description: String {
            switch self { case let .spawnFailed(path, e): return "cannot run \(path): \(String(cString: strerror(e)))" }
        }
    }

    public static func run(_ path: String, _ arguments: [String]) throws -> Outcome {
        var fds: [Int32] = [0, 0]
        guard pipe(&fds) == 0 else { throw Failure.spawnFailed(path: path, errno: errno) }
        _ = fcntl(fds[0], F_SETFD, FD_CLOEXEC)
        _ = fcntl(fds[1], F_SETFD, FD_CLOEXEC)
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_adddup2(&actions, fds[1], 1)
        posix_spawn_file_actions_adddup2(&actions, fds[1], 2)
        var argv = ([path] + arguments).map { strdup($0) } + [nil]
        defer { for p in argv { free(p) } }
        // The child starts with no signal blocked (this process blocks its stop signals).
        var attributes = posix_spawnattr_t()
        posix_spawnattr_init(&attributes)
        defer { posix_spawnattr_destroy(&attributes) }
        _ = host_lifecycle_prepare_spawn(&attributes)
        var pid: pid_t = 0
        let rc = posix_spawn(&pid, path, &actions, &attributes, &argv, environ)
        close(fds[1])
        guard rc == 0 else { close(fds[0]); throw Failure.spawnFailed(path: path, errno: rc) }
        var output: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 4096)
        while true {
            let n = chunk.withUnsafeMutableBytes { read(fds[0], $0.baseAddress, $0.count) }
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { break }
            output += chunk[0..<n]
        }
        close(fds[0])
        var status: Int32 = 0
        while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
        let exit = status & 0x7F == 0 ? (status >> 8) & 0xFF : 128 + (status & 0x7F)
        return Outcome(status: exit, output: String(decoding: output, as: UTF8.self))
    }
}
