#if canImport(Glibc)
import Glibc
#endif
import VirtCore

/// Why the API cannot listen at, or reach, a socket path.
public enum APISocketError: Error, Equatable, CustomStringConvertible {
    case inUse(String)
    case notASocket(String)
    case pathTooLong(String)
    case failed(path: String, operation: String, errno: Int32)

    public var description: String {
        switch self {
        case let .inUse(path): return "\(path) is in use by a running VM (its API socket answers); choose another path"
        case let .notASocket(path): return "\(path) exists and is not a socket; refusing to replace it"
        case let .pathTooLong(path): return "socket path is too long (at most 107 bytes): \(path)"
        case let .failed(path, op, err): return "API socket \(path): \(op) failed: \(String(cString: strerror(err)))"
        }
    }
}

/// The rules for an API socket's path: a live socket (one that accepts a connection) and
/// anything that is not a socket are never removed; only a stale socket (connecting is
/// refused: its process is gone) is.
public enum APISocketPath {
    /// Makes `path` free for a new socket, or throws why it is not.
    public static func prepare(_ path: String) throws(APISocketError) {
        var info = stat()
        guard lstat(path, &info) == 0 else {
            if errno == ENOENT { return }
            throw .failed(path: path, operation: "stat", errno: errno)
        }
        guard info.st_mode & S_IFMT == S_IFSOCK else { throw .notASocket(path) }
        let fd = try connect(path)
        if fd >= 0 {
            close(fd)
            throw .inUse(path)
        }
        guard unlink(path) == 0 || errno == ENOENT else { throw .failed(path: path, operation: "unlink", errno: errno) }
    }

    /// A connected stream socket to `path`; -1 if connecting was refused (a stale socket).
    static func connect(_ path: String) throws(APISocketError) -> Int32 {
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw .failed(path: path, operation: "socket", errno: errno) }
        var addr = try address(path)
        let rc = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        if rc == 0 { return fd }
        let err = errno
        close(fd)
        if err == ECONNREFUSED { return -1 }
        throw .failed(path: path, operation: "connect", errno: err)
    }

    static func address(_ path: String) throws(APISocketError) -> sockaddr_un {
        guard let addr = sockaddr_un.forPath(path) else { throw .pathTooLong(path) }
        return addr
    }
}
