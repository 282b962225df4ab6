/// What engines differ in. A service asks the engine's VM or vCPU for the capability it
/// needs (`try vm.require(FrameRemapping.self, .frameRemapping)`) instead of casting to a
/// concrete engine type; an engine that lacks it gives one clear line.
public enum EngineCapability: String, CaseIterable, Sendable, Codable, CustomStringConvertible {
    /// `DirtyPageLogging`: which guest pages were written since the last look.
    case dirtyLogging = "dirty-logging"
    /// `SecondLevelTranslation`: per-page read/write/execute permissions in a second-level
    /// table (write protection for copy-on-write), violations as `.memoryFault` exits.
    case secondLevelTranslation = "second-level-translation"
    /// `FrameRemapping`: point a guest page at another host frame (frame sharing for dedup).
    case frameRemapping = "frame-remapping"
    /// `CodeCacheCoherence`: the engine caches decoded or translated guest code and must be
    /// told when the host writes guest memory behind the vCPUs' backs.
    case codeCacheCoherence = "code-cache-coherence"
    /// `PreemptionTimer`: a vCPU exits after a given number of guest instructions.
    case preemptionTimer = "preemption-timer"
    /// `InstructionCounting`: retired guest instructions and how they were executed.
    case instructionCounting = "instruction-counting"
    /// `NotificationOffload`: a guest write to an address signals an eventfd without an exit
    /// to the VMM (KVM's ioeventfd).
    case notificationOffload = "notification-offload"
    /// `ReferenceRunLoop`: the engine can run a vCPU through a plain C loop, the baseline
    /// of the exit-cost benchmark.
    case referenceRunLoop = "reference-run-loop"
    /// `ShadowPagingVM`/`ShadowPagingVCPU`: the engine walks VMM-built shadow page tables
    /// instead of the guest's tables and the second level (scenario S5).
    case shadowPaging = "shadow-paging"
    /// `ModeBasedExecuteControl`: separate second-level execute permissions for user-mode
    /// and supervisor-mode guest mappings (Intel MBEC), violations qualified through
    /// `SecondLevelViolationReporting` (scenario S10).
    case modeBasedExecute = "mode-based-execute"
    /// `EncryptedMemory`: confidential VMs, guest memory encrypted by the engine (S11).
    case encryptedMemory = "encrypted-memory"

    public var description: String { rawValue }

    /// What a service wanted to do, for "the kvm engine cannot …".
    public var verbPhrase: String {
        switch self {
        case .dirtyLogging: return "log dirty pages"
        case .secondLevelTranslation: return "set second-level page permissions"
        case .frameRemapping: return "remap guest pages to shared frames"
        case .codeCacheCoherence: return "invalidate cached guest code"
        case .preemptionTimer: return "stop a vCPU after a number of instructions (preemption timer)"
        case .instructionCounting: return "count guest instructions"
        case .notificationOffload: return "deliver queue notifications without exits (ioeventfd)"
        case .referenceRunLoop: return "run a vCPU through the reference C loop"
        case .shadowPaging: return "translate through VMM-built shadow page tables"
        case .modeBasedExecute: return "control user and supervisor execution separately in the second level (MBEC)"
        case .encryptedMemory: return "encrypt guest memory (confidential VMs; the host CPU has no SEV)"
        }
    }
}

/// A service needed a capability the engine does not have.
public struct CapabilityUnavailable: Error, Equatable, Sendable, CustomStringConvertible {
    public let engine: String
    public let capability: EngineCapability
    /// What needed it ("copy-on-write snapshot", say), if given.
    public let neededBy: String?

    public init(engine: String, capability: EngineCapability, neededBy: String? = nil) {
        self.engine = engine; self.capability = capability; self.neededBy = neededBy
    }

    public var description: String {
        "the \(engine) engine cannot \(capability.verbPhrase)" + (neededBy.map { ", which \($0) needs" } ?? "")
    }
}

/// Permissions of one guest page in a second-level (EPT-like) table.
public struct PagePermissions: OptionSet, Sendable, Hashable, Codable {
    public let rawValue: UInt8
    public init(rawValue: UInt8) { self.rawValue = rawValue }
    public static let read = PagePermissions(rawValue: 1)
    public static let write = PagePermissions(rawValue: 2)
    /// Execute; with mode-based execute control (MBEC) on, only for supervisor-mode
    /// guest mappings (Intel's XS bit).
    public static let execute = PagePermissions(rawValue: 4)
    /// With MBEC on: execute for user-mode guest mappings (Intel's XU bit); ignored otherwise.
    public static let userExecute = PagePermissions(rawValue: 8)
    public static let all: PagePermissions = [.read, .write, .execute, .userExecute]
}

/// Logs which guest pages are written (KVM: the slot's dirty log; software engine: the
/// dirty flags of its second-level page table).
public protocol DirtyPageLogging: VM {
    /// Starts or stops logging. Starting clears the log.
    func setDirtyLogging(_ enabled: Bool) throws
    /// The pages written since logging started or since the last fetch, which clears it.
    /// Callable while vCPUs run on KVM; on the software engine the vCPUs must be out of
    /// `run()` for the clearing to be exact.
    func fetchDirtyLog() throws -> DirtyBitmap
}

/// A second-level page table the VMM controls: a guest access its permissions forbid is not
/// executed, and the vCPU's `run()` returns `.memoryFault(gpa:access:)`; the access is
/// retried on the next `run()`. Changes take effect for every vCPU at its next exit.
public protocol SecondLevelTranslation: VM {
    /// Guest pages the table covers (all of RAM).
    var secondLevelPageCount: Int { get }
    func permissions(page: Int) -> PagePermissions
    func setPermissions(_ permissions: PagePermissions, pages: Range<Int>)
}

/// Guest pages mapped onto host frames other than their own (frame sharing).
public protocol FrameRemapping: SecondLevelTranslation {
    /// The host frame (page number within the VM's RAM) `page` maps to.
    func frame(of page: Int) -> Int
    func map(page: Int, toFrame frame: Int, permissions: PagePermissions)
}

/// An engine that caches decoded or translated guest code keyed by guest-physical page.
/// Guest writes are tracked by the engine itself; writes the host makes behind the vCPUs'
/// backs (loading code, restoring pages, remapping) must be reported. Call while no vCPU runs.
public protocol CodeCacheCoherence: VM {
    func hostDidWrite(gpa: UInt64, length: UInt64)
    func hostDidWriteAll()
}

/// Offloaded notifications: a guest write of `value` (`length` bytes) to `address`
/// signals `eventFD` inside the engine instead of exiting to the VMM.
public protocol NotificationOffload: VM {
    /// False when the host lacks the mechanism (the VMM then takes ordinary exits).
    var notificationOffloadAvailable: Bool { get }
    func assignNotification(address: UInt64, length: UInt32, value: UInt64, eventFD: Int32) throws
    func deassignNotification(address: UInt64, length: UInt32, value: UInt64, eventFD: Int32) throws
}

/// A timer counting guest instructions (the VMX preemption timer's model): after
/// `instructions` more instruction attempts, `run()` returns `.preemptionTimer` once.
/// Arm and disarm on the vCPU's own thread.
public protocol PreemptionTimer: VCPU {
    func armPreemptionTimer(instructions: UInt64)
    func disarmPreemptionTimer()
}

/// How a vCPU executed its guest's instructions so far.
public struct ExecutionCounts: Sendable, Equatable, Codable {
    /// Instructions retired.
    public var instructions: UInt64
    /// Instruction attempts made by an interpreter (all of them when nothing is translated).
    public var interpreted: UInt64
    /// Guest blocks compiled to host code.
    public var blocksTranslated: UInt64
    /// Whether the vCPU runs translated code at all.
    public var translating: Bool

    public init(instructions: UInt64 = 0, interpreted: UInt64 = 0, blocksTranslated: UInt64 = 0, translating: Bool = false) {
        self.instructions = instructions; self.interpreted = interpreted
        self.blocksTranslated = blocksTranslated; self.translating = translating
    }

    /// The share of retired instructions that ran as translated code.
    public var translatedShare: Double {
        instructions == 0 ? 0 : 1 - Double(min(interpreted, instructions)) / Double(instructions)
    }

    public static func + (a: ExecutionCounts, b: ExecutionCounts) -> ExecutionCounts {
        ExecutionCounts(instructions: a.instructions &+ b.instructions, interpreted: a.interpreted &+ b.interpreted,
                        blocksTranslated: a.blocksTranslated &+ b.blocksTranslated, translating: a.translating || b.translating)
    }

    /// What ran between two readings (`a` the later).
    public static func - (a: ExecutionCounts, b: ExecutionCounts) -> ExecutionCounts {
        ExecutionCounts(instructions: a.instructions &- b.instructions, interpreted: a.interpreted &- b.interpreted,
                        blocksTranslated: a.blocksTranslated &- b.blocksTranslated, translating: a.translating)
    }
}

/// Retired-instruction counts (a hardware VMM would read a performance counter).
/// Read after `run()` returned, or from the vCPU's own thread.
public protocol InstructionCounting: VCPU {
    var executionCounts: ExecutionCounts { get }
}

/// The engine runs a vCPU through a minimal loop of its own (no VMM work per exit) until
/// the guest writes the exit port: the baseline the exit-cost benchmark compares with.
public protocol ReferenceRunLoop: VCPU {
    /// Port-I/O exits taken and the value written to `exitPort`.
    func runReferenceLoop(exitPort: UInt16) throws -> (ioExits: UInt64, exitValue: UInt32)
}

extension VM {
    /// The capabilities this VM's engine offers.
    public var capabilities: [EngineCapability] {
        var c: [EngineCapability] = []
        if self is any DirtyPageLogging { c.append(.dirtyLogging) }
        if self is any SecondLevelTranslation { c.append(.secondLevelTranslation) }
        if self is any FrameRemapping { c.append(.frameRemapping) }
        if self is any CodeCacheCoherence { c.append(.codeCacheCoherence) }
        if self is any ShadowPagingVM { c.append(.shadowPaging) }
        if self is any ModeBasedExecuteControl { c.append(.modeBasedExecute) }
        if self is any EncryptedMemory { c.append(.encryptedMemory) }
        if let n = self as? any NotificationOffload, n.notificationOffloadAvailable { c.append(.notificationOffload) }
        return c
    }

    /// This VM as capability `C`, or a `CapabilityUnavailable` naming the engine.
    public func require<C>(_ type: C.Type, _ capability: EngineCapability, neededBy: String? = nil) throws(CapabilityUnavailable) -> C {
        guard let c = self as? C else { throw CapabilityUnavailable(engine: engineName, capability: capability, neededBy: neededBy) }
        return c
    }

    /// Reports a host write of guest memory to an engine that caches code; nothing otherwise.
    public func noteHostWrite(gpa: UInt64, length: UInt64) {
        (self as? any CodeCacheCoherence)?.hostDidWrite(gpa: gpa, length: length)
    }
}

extension VCPU {
    /// This vCPU as capability `C`, or a `CapabilityUnavailable` naming the engine.
    public func require<C>(_ type: C.Type, _ capability: EngineCapability, engine: String, neededBy: String? = nil) throws(CapabilityUnavailable) -> C {
        guard let c = self as? C else { throw CapabilityUnavailable(engine: engine, capability: capability, neededBy: neededBy) }
        return c
    }
}
