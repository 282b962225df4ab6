/// How guest-virtual addresses reach host memory (scenario S5).
public enum PagingMode: String, CaseIterable, Sendable, Codable, CustomStringConvertible {
    /// The engine walks the guest's page tables, then the second-level table for every
    /// guest-physical address the walk touches (EPT/NPT).
    case nested
    /// The VMM keeps shadow page tables (guest-virtual → host) built from the guest's tables;
    /// the engine walks only those. Guest page-table writes, CR3 loads, INVLPG and shadow
    /// misses exit to the VMM.
    case shadow

    public var description: String { rawValue }
}

/// What a vCPU in shadow mode reports to the VMM (`VMExit.shadowPaging`).
public enum ShadowPagingEvent: Sendable, Equatable {
    /// The shadow tables lack a translation for `linear`, or forbid the access. `errorCode`
    /// is the #PF error code of the access (bits W, U, I tell what was tried). Fault-like:
    /// the instruction (or event delivery) is retried on the next `run()`.
    /// Bit 31 of `errorCode` (not architectural) marks an implicit supervisor-mode access
    /// (`implicitAccess`), which SMAP forbids whatever RFLAGS.AC says.
    case pageFault(linear: UInt64, errorCode: UInt32)
    /// The guest wrote CR3 (or CR0/CR4/EFER, which change how its tables read). Trap-like:
    /// the write has happened; the vCPU has no shadow root until the VMM sets one.
    case contextSwitch(cr3: UInt64)
    /// The guest executed INVLPG (trap-like; the vCPU's own TLB entry is already gone).
    case invalidatePage(linear: UInt64)
}

extension ShadowPagingEvent {
    public static let implicitAccess: UInt32 = 1 << 31
}

/// The paging state of a vCPU that the VMM's walk of the guest tables needs.
public struct GuestPagingContext: Sendable, Equatable {
    public var cr0: UInt64, cr3: UInt64, cr4: UInt64, efer: UInt64, rflags: UInt64
    public init(cr0: UInt64, cr3: UInt64, cr4: UInt64, efer: UInt64, rflags: UInt64) {
        self.cr0 = cr0; self.cr3 = cr3; self.cr4 = cr4; self.efer = efer; self.rflags = rflags
    }
    public var writeProtect: Bool { cr0 & (1 << 16) != 0 }
    public var smep: Bool { cr4 & (1 << 20) != 0 }
    public var smap: Bool { cr4 & (1 << 21) != 0 }
    public var noExecuteEnabled: Bool { efer & (1 << 11) != 0 }
    public var alignmentCheck: Bool { rflags & (1 << 18) != 0 }
    public var pagingEnabled: Bool { cr0 & (1 << 31) != 0 }
}

/// Shadow page tables: pages of 512 x86 page-table entries in host memory that the VMM
/// writes and the engine walks. Page 0 is never handed out (a root of 0 means "none").
///
/// Entry format (as x86-64 4-level paging, 4 KiB leaves only): bit 0 present, 1 writable,
/// 2 user, 63 no-execute, bits 12–51 the next table's page number in this pool (non-leaf)
/// or the host frame's offset in the VM's RAM (leaf). Bit 9 (`writeTrap`) on a leaf: every
/// write through it exits to the VMM whatever the guest allows (a write-protected guest
/// page table, a page the guest has not yet dirtied, a page the second level write-protects).
public final class ShadowPageTablePool: @unchecked Sendable {
    // SAFETY: entries are written by the VMM under its own lock and read by vCPU threads with
    // plain aligned 8-byte loads; a reader sees the old or the new entry, and the VMM flushes
    // every vCPU's TLB (`ShadowPagingVM.flushShadowTranslations`) after a restricting change.
    public static let present: UInt64 = 1, writable: UInt64 = 2, user: UInt64 = 4
    public static let writeTrap: UInt64 = 1 << 9
    public static let noExecute: UInt64 = 1 << 63
    public static let frameMask: UInt64 = 0x000F_FFFF_FFFF_F000

    public let pageCount: Int
    public let entries: UnsafeMutablePointer<UInt64>

    public init(pageCount: Int) {
        precondition(pageCount >= 2, "a shadow pool needs a page besides the null page")
        self.pageCount = pageCount
        entries = .allocate(capacity: pageCount * 512)
        entries.initialize(repeating: 0, count: pageCount * 512)
    }

    deinit { entries.deallocate() }

    @inline(__always) public func entry(page: Int, index: Int) -> UInt64 { entries[page &* 512 &+ index] }
    @inline(__always) public func setEntry(page: Int, index: Int, _ value: UInt64) { entries[page &* 512 &+ index] = value }
    public func clear(page: Int) { (entries + page * 512).update(repeating: 0, count: 512) }
}

/// The outcome of the second-level check the VMM makes when it fills a shadow entry.
public enum SecondLevelLookup: Sendable, Equatable {
    /// Allowed: the host offset of the page in the VM's RAM and whether later writes may
    /// go straight through (the second level allows them and has marked the page dirty).
    case host(offset: UInt64, writable: Bool, executable: Bool)
    /// The second level forbids the access (an EPT violation).
    case violation(gpa: UInt64, access: MemoryAccessKind)
    /// No RAM behind the address (MMIO).
    case notRAM
}

/// Shadow paging support of an engine's VM (`EngineCapability.shadowPaging`).
public protocol ShadowPagingVM: VM {
    /// The second-level (EPT-model) translation of `gpa`, checked for `access` and with its
    /// accessed (and for writes dirty) flag set, as the engine's own walk would.
    /// `userAddress`: the guest mapping is a user-mode one (MBEC picks the execute bit by it).
    func lookUpSecondLevel(_ gpa: UInt64, access: MemoryAccessKind, userAddress: Bool) -> SecondLevelLookup
    /// Bumped whenever the second level takes something away (a permission, a frame, a
    /// dirty flag): shadow entries made under an older generation may grant what the second
    /// level no longer does. Lifting restrictions leaves it alone.
    var secondLevelGeneration: UInt64 { get }
    /// Where `gpa` lives in the VM's RAM (the second level's frame), without a permission
    /// check — how a walk reads a guest page-table entry. nil outside RAM.
    func hostOffset(of gpa: UInt64) -> UInt64?
    /// Every vCPU drops its cached translations; returns once each running vCPU has done
    /// so (one outside `run()` does it on entry). Call after making shadow entries stricter.
    func flushShadowTranslations()
}

/// Shadow paging support of an engine's vCPU. Called on the vCPU's own thread while it is
/// out of `run()`.
public protocol ShadowPagingVCPU: VCPU {
    /// Switches the vCPU to shadow mode over `pool` (before it first runs).
    func enableShadowPaging(_ pool: ShadowPageTablePool)
    /// The shadow table (a pool page) the vCPU walks; 0: none, every access exits. The
    /// engine resets it to 0 when the guest's paging state changes (`contextSwitch`) or is
    /// loaded (`setState`). Setting it flushes the vCPU's TLB.
    var shadowRoot: Int { get set }
    var pagingContext: GuestPagingContext { get }
    /// CPL 3.
    var isUserMode: Bool { get }
    /// Delivers a guest #PF (CR2 = `address`) on the next `run()`, or combines it with the
    /// event whose delivery the shadow fault interrupted (#DF rules).
    func injectPageFault(address: UInt64, errorCode: UInt32)
    /// Executes the instruction that stopped at a write trap, letting its writes to host
    /// frame `frame` through once (the VMM's emulation of a guest page-table write).
    /// Writes to other trapped frames still exit.
    func emulateTrappedWrite(frame: UInt64)
}

/// The largest page a second-level table maps guest memory with.
public enum SecondLevelPageSize: String, CaseIterable, Sendable, Codable, CustomStringConvertible {
    case size4K = "4K", size2M = "2M", size1G = "1G"
    public var description: String { rawValue }
    /// Levels a walk of the table reads for an address inside such a page.
    public var walkLevels: Int {
        switch self {
        case .size4K: return 4
        case .size2M: return 3
        case .size1G: return 2
        }
    }
}

/// A second-level table whose page size the VMM picks (for walk-length accounting: a
/// nested walk reads the second level once per guest level and once for the data).
public protocol SecondLevelPageSizing: VM {
    var secondLevelLargestPage: SecondLevelPageSize { get set }
}

/// What a second-level violation was (the VMX exit qualification's content).
public struct SecondLevelViolation: Sendable, Equatable, Codable {
    public var gpa: UInt64
    /// The guest-linear address, when the access had one (not for a walk's own reads).
    public var linear: UInt64?
    /// The access tried: read, write or execute.
    public var access: UInt8
    /// The page's second-level permissions.
    public var allowed: PagePermissions
    /// The guest mapped the address user-accessible (decides the execute bit under MBEC).
    public var userAddress: Bool
    public var modeBasedExecute: Bool

    public init(gpa: UInt64, linear: UInt64?, access: MemoryAccessKind, allowed: PagePermissions, userAddress: Bool, modeBasedExecute: Bool) {
        self.gpa = gpa; self.linear = linear; self.access = access.rawValue; self.allowed = allowed
        self.userAddress = userAddress; self.modeBasedExecute = modeBasedExecute
    }

    public var accessKind: MemoryAccessKind { MemoryAccessKind(rawValue: access) }
}

/// Mode-based execute control in the second-level table (Intel MBEC), and the last
/// violation's qualification.
public protocol ModeBasedExecuteControl: VM {
    var modeBasedExecute: Bool { get set }
}

public protocol SecondLevelViolationReporting: VCPU {
    /// The qualification of the second-level violation behind the last `.memoryFault` exit.
    var lastSecondLevelViolation: SecondLevelViolation? { get }
}

/// A vCPU's page-walk counters: TLB lookups, the walks the misses caused, and the table
/// entries those walks read (a nested walk counts its second-level reads too).
public struct PageWalkCounts: Sendable, Equatable, Codable {
    public var tlbLookups: UInt64
    public var walks: UInt64
    public var references: UInt64
    public init(tlbLookups: UInt64 = 0, walks: UInt64 = 0, references: UInt64 = 0) {
        self.tlbLookups = tlbLookups; self.walks = walks; self.references = references
    }
    public static func + (a: PageWalkCounts, b: PageWalkCounts) -> PageWalkCounts {
        PageWalkCounts(tlbLookups: a.tlbLookups &+ b.tlbLookups, walks: a.walks &+ b.walks, references: a.references &+ b.references)
    }
    public var referencesPerWalk: Double { walks == 0 ? 0 : Double(references) / Double(walks) }
    /// Share of lookups that hit (nil before any lookup).
    public var tlbHitRate: Double? { tlbLookups == 0 ? nil : 1 - Double(min(walks, tlbLookups)) / Double(tlbLookups) }
}

public protocol PageWalkCounting: VCPU {
    var pageWalkCounts: PageWalkCounts { get }
}
