#if canImport(Glibc)
import Glibc
#endif
import Synchronization

/// A lock guarding state kept beside it, for classes whose fields several threads touch
/// (the role NSLock plays, without Foundation on the run path).
public final class HostLock: Sendable {
    private let mutex = Mutex(())
    public init() {}

    public func withLock<T, E: Error>(_ body: () throws(E) -> T) throws(E) -> T {
        try mutex.withLock { _ throws(E) in try body() }
    }
}

/// Where temporary files go: $TMPDIR, or /tmp.
public enum HostPaths {
    public static var temporaryDirectory: String {
        var dir = getenvString("TMPDIR") ?? "/tmp"
        if !dir.hasSuffix("/") { dir += "/" }
        return dir
    }

    static func getenvString(_ name: String) -> String? {
        guard let p = getenv(name), p.pointee != 0 else { return nil }
        return String(cString: p)
    }
}

extension StringProtocol {
    /// Without leading and trailing spaces, tabs and newlines.
    public var trimmed: String {
        let isSpace: (Character) -> Bool = { $0 == " " || $0 == "\t" || $0 == "\n" || $0 == "\r" }
        guard let first = firstIndex(where: { !isSpace($0) }), let last = lastIndex(where: { !isSpace($0) }) else { return "" }
        return String(self[first...last])
    }
}
