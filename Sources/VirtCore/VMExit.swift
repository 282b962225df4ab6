/// Direction of a port or MMIO access, seen from the guest.
public enum AccessDirection: UInt8, Sendable, Equatable {
    case read = 0
    case write = 1
}

/// A single guest `in`/`out` (not the `rep ins/outs` string form).
public struct PortAccess: Sendable, Equatable {
    public var port: UInt16
    /// 1, 2 or 4 bytes.
    public var size: UInt8
    public var direction: AccessDirection
    /// For writes, the value written (low `size` bytes).
    public var value: UInt32

    public init(port: UInt16, size: UInt8, direction: AccessDirection, value: UInt32 = 0) {
        self.port = port; self.size = size; self.direction = direction; self.value = value
    }
}

/// A guest load or store that reached a guest-physical address with no RAM behind it.
public struct MMIOAccess: Sendable, Equatable {
    public var address: UInt64
    /// 1, 2, 4 or 8 bytes.
    public var size: UInt8
    public var direction: AccessDirection
    /// For writes, the value written (low `size` bytes).
    public var value: UInt64

    public init(address: UInt64, size: UInt8, direction: AccessDirection, value: UInt64 = 0) {
        self.address = address; self.size = size; self.direction = direction; self.value = value
    }
}

/// A hypercall: `vmcall` (software engine) or the doorbell port (KVM). See docs/guest-abi.md.
public struct Hypercall: Sendable, Equatable {
    public var number: UInt64
    public var arg0: UInt64, arg1: UInt64, arg2: UInt64, arg3: UInt64
    /// RBX and RCX too: KVM's hypercalls take their arguments in RBX, RCX, RDX, RSI.
    public var rbx: UInt64, rcx: UInt64

    public init(number: UInt64, arg0: UInt64 = 0, arg1: UInt64 = 0, arg2: UInt64 = 0, arg3: UInt64 = 0, rbx: UInt64 = 0, rcx: UInt64 = 0) {
        self.number = number; self.arg0 = arg0; self.arg1 = arg1; self.arg2 = arg2; self.arg3 = arg3
        self.rbx = rbx; self.rcx = rcx
    }

    public var args: [UInt64] { [arg0, arg1, arg2, arg3] }
}

/// Kind of a second-level (EPT-like) access that faulted.
public struct MemoryAccessKind: OptionSet, Sendable, Hashable {
    public let rawValue: UInt8
    public init(rawValue: UInt8) { self.rawValue = rawValue }
    public static let read = MemoryAccessKind(rawValue: 1)
    public static let write = MemoryAccessKind(rawValue: 2)
    public static let execute = MemoryAccessKind(rawValue: 4)
}

/// Why `VCPU.run()` returned. Both engines produce the same exits for the same guest.
public enum VMExit: Sendable, Equatable {
    case portIO(PortAccess)
    /// `rep ins/outs`: `count` elements of `size` bytes; for writes `data` holds them.
    case stringPortIO(port: UInt16, size: UInt8, direction: AccessDirection, count: UInt32, data: [UInt8])
    case mmio(MMIOAccess)
    case hypercall(Hypercall)
    /// `hlt` executed (with nothing to wake the vCPU inside the engine).
    case halt
    /// Triple fault or a shutdown request: the vCPU cannot continue.
    case shutdown
    /// The engine refused to enter the guest (bad state); the hardware reason code.
    case failEntry(hardwareReason: UInt64)
    /// The engine could not emulate something; KVM's suberror, its data words, and the
    /// bytes at the faulting RIP when they could be read.
    case internalError(suberror: UInt32, data: [UInt64], instructionBytes: [UInt8])
    /// A second-level page-table violation (software engine's EPT model).
    case memoryFault(gpa: UInt64, access: MemoryAccessKind)
    /// The preemption timer the VMM armed has expired.
    case preemptionTimer
    /// An exception the VMM asked to intercept.
    case exception(vector: UInt8, errorCode: UInt32?)
    /// Another thread asked this vCPU to stop (`VCPU.requestExit()`).
    case interrupted
    case systemEvent(type: UInt32)
    case unknown(reason: UInt32)
    /// Shadow paging (software engine, `PagingMode.shadow`): a shadow miss or write trap,
    /// a CR3 load or an INVLPG for the VMM's shadow-table code.
    case shadowPaging(ShadowPagingEvent)

    public var reason: ExitReason {
        switch self {
        case .portIO, .stringPortIO: return .portIO
        case .mmio: return .mmio
        case .hypercall: return .hypercall
        case .halt: return .halt
        case .shutdown: return .shutdown
        case .failEntry: return .failEntry
        case .internalError: return .internalError
        case .memoryFault: return .memoryFault
        case .preemptionTimer: return .preemptionTimer
        case .exception: return .exception
        case .interrupted: return .interrupted
        case .systemEvent: return .systemEvent
        case .unknown: return .unknown
        case .shadowPaging: return .shadowPaging
        }
    }
}

/// The payload-free kind of a `VMExit`, for accounting.
public enum ExitReason: Int, CaseIterable, Sendable, Codable {
    case portIO, mmio, hypercall, halt, shutdown, failEntry, internalError, memoryFault
    case preemptionTimer, exception, interrupted, systemEvent, unknown, shadowPaging

    public var name: String {
        switch self {
        case .portIO: return "io"
        case .mmio: return "mmio"
        case .hypercall: return "hypercall"
        case .halt: return "hlt"
        case .shutdown: return "shutdown"
        case .failEntry: return "fail-entry"
        case .internalError: return "internal-error"
        case .memoryFault: return "memory-fault"
        case .preemptionTimer: return "preemption-timer"
        case .exception: return "exception"
        case .interrupted: return "interrupted"
        case .systemEvent: return "system-event"
        case .unknown: return "unknown"
        case .shadowPaging: return "shadow-paging"
        }
    }
}
