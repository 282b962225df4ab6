#if canImport(Glibc)
import Glibc
#endif
import VirtCore

/// Calls `body` with `path` as a Unix-domain socket address, for the tests' own `connect`
/// and `bind` calls.
public func withUnixSocketAddress<R>(_ path: String, _ body: (UnsafePointer<sockaddr>, socklen_t) -> R) -> R {
    guard var addr = sockaddr_un.forPath(path) else { preconditionFailure("test socket path too long: \(path)") }
    return withUnsafePointer(to: &addr) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { body($0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
    }
}
