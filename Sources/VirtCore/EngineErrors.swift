#if canImport(Glibc)
import Glibc
#endif

/// Why `VCPU.run()` could not run the guest at all: the engine's own call to the host
/// failed (KVM_RUN, KVM_INTERRUPT, …). Guest-caused stops are `VMExit`s, not errors.
public enum VCPUError: Error, Equatable, Sendable, Codable, CustomStringConvertible {
    case hostCallFailed(operation: String, errno: Int32)

    public var description: String {
        switch self {
        case let .hostCallFailed(operation, err): return "\(operation) failed: \(String(cString: strerror(err)))"
        }
    }
}

/// Why a machine's engine stopped running the guest (`StopReason.engineFailure`): the error
/// itself, so callers can tell the cases apart; `description` is the line for the user.
public enum EngineFailure: Error, Equatable, Sendable, CustomStringConvertible {
    /// `VCPU.run()` threw.
    case run(VCPUError)
    /// The engine refused to enter the guest; the hardware reason code.
    case entryFailed(hardwareReason: UInt64)
    /// The engine could not emulate an instruction (KVM internal error): suberror, data
    /// words, the bytes at RIP and RIP when they could be read.
    case internalError(suberror: UInt32, data: [UInt64], instructionBytes: [UInt8], rip: UInt64?)
    /// An exception exit the VMM did not ask for.
    case unhandledException(vector: UInt8, errorCode: UInt32?)
    /// A second-level violation no service claimed.
    case unhandledMemoryFault(gpa: UInt64, access: MemoryAccessKind)
    case systemEvent(type: UInt32)
    case unknownExit(reason: UInt32)
    /// A post-copy migration lost its source before every page arrived; the guest stops
    /// rather than run on missing memory.
    case postcopy(String)
    /// The VMM's per-vCPU thread set-up (pinning, scheduling policy) failed.
    case threadSetup(String)
    /// The engine reported a shadow-paging event for a VM the VMM does not shadow-page.
    case shadowPagingExitOutsideShadowMode
    /// RAM a lazily restored VM needed could not be supplied (the snapshot chunk is corrupt
    /// or unreadable); the VM stops rather than run on zeros.
    case lazyRestore(page: Int, reason: String)

    public var description: String {
        func hex(_ v: UInt64) -> String { "0x" + String(v, radix: 16) }
        switch self {
        case let .run(error): return "\(error)"
        case let .entryFailed(code): return "entry failed, hardware reason \(hex(code))"
        case let .internalError(suberror, data, bytes, rip):
            var s = "internal error (suberror \(suberror)" + (suberror == 1 ? ": instruction emulation failed)" : ")")
            if let rip { s += " at rip \(hex(rip))" }
            if !bytes.isEmpty { s += ", instruction bytes: " + bytes.map { ($0 < 16 ? "0" : "") + String($0, radix: 16) }.joined(separator: " ") }
            if !data.isEmpty { s += ", data: " + data.map(hex).joined(separator: " ") }
            return s
        case let .unhandledException(vector, code):
            return "unhandled exception \(vector) error \(code.map { String($0) } ?? "none")"
        case let .unhandledMemoryFault(gpa, _): return "memory fault at \(hex(gpa))"
        case let .systemEvent(type): return "system event \(type)"
        case let .unknownExit(reason): return "unknown exit reason \(reason)"
        case let .postcopy(reason): return "post-copy: \(reason)"
        case let .threadSetup(reason): return "vCPU thread setup: \(reason)"
        case .shadowPagingExitOutsideShadowMode: return "shadow-paging exit outside shadow mode"
        case let .lazyRestore(page, reason): return "lazy restore: page \(page): \(reason)"
        }
    }
}
