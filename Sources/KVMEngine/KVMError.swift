#if canImport(Glibc)
import Glibc
#endif

/// Everything that can go wrong talking to /dev/kvm, each with a message a user can act on.
public enum KVMError: Error, Equatable, Sendable, CustomStringConvertible {
    case deviceMissing(path: String)
    case permissionDenied(path: String)
    case openFailed(path: String, errno: Int32)
    case apiVersionMismatch(found: Int32, expected: Int32)
    case missingCapability(name: String)
    case tooManyVCPUs(requested: Int, limit: Int)
    case ioctlFailed(operation: String, errno: Int32)

    public var description: String {
        switch self {
        case let .deviceMissing(path):
            return "\(path) does not exist: this host has no KVM (enable virtualization or load the kvm module)"
        case let .permissionDenied(path):
            return "permission denied opening \(path): add your user to the 'kvm' group or run as root"
        case let .openFailed(path, err):
            return "cannot open \(path): \(Self.errnoText(err))"
        case let .apiVersionMismatch(found, expected):
            return "KVM API version \(found) is not the expected \(expected)"
        case let .missingCapability(name):
            return "this KVM lacks the capability \(name), which Swiftvisor needs"
        case let .tooManyVCPUs(requested, limit):
            return "\(requested) vCPUs requested but this KVM allows at most \(limit)"
        case let .ioctlFailed(op, err):
            return "\(op) failed: \(Self.errnoText(err))"
        }
    }

    static func errnoText(_ err: Int32) -> String { String(cString: strerror(err)) }

    /// Throws `.ioctlFailed` for a negative shim result (which is -errno).
    @inline(__always)
    static func check(_ result: Int32, _ operation: @autoclosure () -> String) throws(KVMError) -> Int32 {
        if result < 0 { throw .ioctlFailed(operation: operation(), errno: -result) }
        return result
    }
}
