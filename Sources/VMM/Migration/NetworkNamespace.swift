import CHost
import Dispatch
import FoundationEssentials
#if canImport(Glibc)
import Glibc
#endif

public enum NetworkNamespaceError: Error, Equatable, CustomStringConvertible {
    case cannotEnter(name: String, errno: Int32)

    public var description: String {
        switch self {
        case let .cannotEnter(name, err):
            return "cannot enter network namespace \(name): \(String(cString: strerror(err))) (it must exist under /var/run/netns, and entering needs CAP_SYS_ADMIN)"
        }
    }
}

/// Named network namespaces (`ip netns add NAME`). A socket belongs to the namespace of the
/// thread that created it, so one process can listen in one namespace and connect from
/// another: a migration between two namespaces joined by a veth pair crosses a real link.
public enum NetworkNamespace {
    /// Runs `body` with the calling thread in namespace `name`, then moves it back. Sockets
    /// made inside stay in `name`.
    public static func run<R>(in name: String, _ body: () throws -> R) throws -> R {
        let target = open("/var/run/netns/\(name)", O_RDONLY | O_CLOEXEC)
        guard target >= 0 else { throw NetworkNamespaceError.cannotEnter(name: name, errno: errno) }
        defer { close(target) }
        let original = open("/proc/thread-self/ns/net", O_RDONLY | O_CLOEXEC)
        guard original >= 0 else { throw NetworkNamespaceError.cannotEnter(name: name, errno: errno) }
        defer { close(original) }
        let rc = host_setns_net(target)
        guard rc == 0 else { throw NetworkNamespaceError.cannotEnter(name: name, errno: -rc) }
        defer {
            let back = host_setns_net(original)
            precondition(back == 0, "could not return the thread to its network namespace (errno \(-back))")
        }
        return try body()
    }
}
