import Dispatch
import FoundationEssentials
import VMM
#if canImport(Glibc)
import Glibc
#endif

/// Two network namespaces joined by a veth pair, each end shaped by a `tbf` qdisc to a link
/// rate: a real network path inside this host for a migration to cross (source in `source`,
/// destination in `destination`). Made with iproute2; `remove()` (or deinit) deletes both
/// namespaces, which takes the veth pair with them.
package final class VethLink: @unchecked Sendable {
    // SAFETY: immutable after init; remove() is idempotent and called from one thread.
    package let source: String
    package let destination: String
    package let sourceAddress = "198.18.0.1"       // RFC 2544 benchmarking range, inside our namespaces only
    package let destinationAddress = "198.18.0.2"
    package let megabitsPerSecond: Int
    private var removed = false

    package enum SetupError: Error, CustomStringConvertible {
        case unavailable(String)
        case commandFailed(command: String, output: String)
        package var description: String {
            switch self {
            case let .unavailable(why): return "network namespaces unavailable: \(why)"
            case let .commandFailed(command, output): return "\(command) failed: \(output)"
            }
        }
    }

    /// Why namespaces cannot be made here, or nil when they can (root and iproute2).
    package static var unavailableReason: String? {
        if geteuid() != 0 { return "needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN)" }
        let installed = ["ip", "tc"].allSatisfy { access("/usr/sbin/\($0)", X_OK) == 0 || access("/sbin/\($0)", X_OK) == 0 }
        return installed ? nil : "iproute2 is not installed (apt-get install -y iproute2)"
    }

    package init(megabitsPerSecond: Int) throws {
        if let why = Self.unavailableReason { throw SetupError.unavailable(why) }
        guard megabitsPerSecond > 0 else { throw SetupError.unavailable("the link rate must be positive") }
        self.megabitsPerSecond = megabitsPerSecond
        let tag = "\(getpid() % 100_000)\(UInt16.random(in: 0...UInt16.max) % 1000)"
        source = "svmig\(tag)a"
        destination = "svmig\(tag)b"
        let a = "sv\(tag)a", b = "sv\(tag)b"  // interface names: at most 15 bytes
        // Enough burst for the rate at a 1 ms timer, and a queue of 50 ms before drops.
        let burst = max(32_768, megabitsPerSecond * 125_000 / 250)
        do {
            try Self.ip(["netns", "add", source])
            try Self.ip(["netns", "add", destination])
            try Self.ip(["link", "add", a, "type", "veth", "peer", "name", b])
            try Self.ip(["link", "set", a, "netns", source])
            try Self.ip(["link", "set", b, "netns", destination])
            try Self.ip(["-n", source, "addr", "add", sourceAddress + "/30", "dev", a])
            try Self.ip(["-n", destination, "addr", "add", destinationAddress + "/30", "dev", b])
            for (ns, dev) in [(source, a), (destination, b)] {
                try Self.ip(["-n", ns, "link", "set", dev, "up"])
                try Self.ip(["-n", ns, "link", "set", "lo", "up"])
                try Self.run(Self.tool("tc"), ["-n", ns, "qdisc", "add", "dev", dev, "root", "tbf", "rate", "\(megabitsPerSecond)mbit",
                                               "burst", "\(burst)", "latency", "50ms"])
            }
        } catch {
            remove()
            throw error
        }
    }

    deinit { remove() }

    /// Deletes both namespaces (and so the veth pair and its qdiscs).
    package func remove() {
        guard !removed else { return }
        removed = true
        for ns in [source, destination] { try? Self.ip(["netns", "del", ns]) }
    }

    private static func tool(_ name: String) -> String {
        access("/usr/sbin/\(name)", X_OK) == 0 ? "/usr/sbin/\(name)" : "/sbin/\(name)"
    }

    private static func ip(_ arguments: [String]) throws { try run(tool("ip"), arguments) }

    private static func run(_ path: String, _ arguments: [String]) throws {
        let outcome = try HostProcess.run(path, arguments)
        guard outcome.status == 0 else {
            throw SetupError.commandFailed(command: ([path] + arguments).joined(separator: " "), output: outcome.output.trimmed)
        }
    }
}
