/// Confidential VMs (scenario S11), in the shape of AMD SEV and SEV-SNP: guest memory is
/// encrypted under a key only the engine's memory path holds; a C-bit in the guest's page
/// tables chooses private (encrypted) or shared (plaintext) per mapping; with SNP a reverse
/// map (RMP) records, per host frame, which guest page owns it, and every guest access is
/// checked against it after the nested walk.
public enum ConfidentialMode: String, Sendable, Codable, CaseIterable, CustomStringConvertible {
    /// Encryption only: the host cannot read guest memory, but may replay or remap it.
    case sev
    /// Encryption and the reverse map: replay, remapping, aliasing and host writes are stopped.
    case snp

    public var description: String { rawValue }
}

public enum ConfidentialLayout {
    /// The C-bit of guest page-table entries (CPUID 0x8000001F EBX[5:0]).
    public static let cBitPosition: UInt64 = 51
    public static let cBit: UInt64 = 1 << cBitPosition
    /// The #VC exception a guest receives for a reverse-map violation.
    public static let vcVector: UInt8 = 29
    /// #VC error codes (the model's own: SNP reports an RMP fault through #NPF/#VC).
    public enum VCError: UInt32, Sendable, Codable {
        /// A private access to a frame the RMP does not assign to this guest.
        case notAssigned = 1
        /// The frame is assigned to this guest, but for another guest-physical page (remap, alias).
        case wrongGuestPage = 2
        /// The frame is assigned but not validated (PVALIDATE) — e.g. after the host reclaimed it.
        case notValidated = 3
        /// A shared (C-bit clear) access to a frame the guest owns.
        case sharedAccessToPrivate = 4
    }
}

/// One reverse-map entry: what a host frame belongs to (SEV-SNP's RMP).
public struct RMPEntry: Sendable, Codable, Equatable {
    public var assigned: Bool
    /// The owning guest's address-space identifier (0: the hypervisor).
    public var asid: UInt16
    /// The guest-physical page the frame is assigned to.
    public var guestPage: Int
    /// Part of a 2 MiB validation (PVALIDATE with ECX=1).
    public var largePage: Bool
    public var validated: Bool
    /// The host may not change it (launch pages under measurement).
    public var immutable: Bool

    public init(assigned: Bool = false, asid: UInt16 = 0, guestPage: Int = 0, largePage: Bool = false,
                validated: Bool = false, immutable: Bool = false) {
        self.assigned = assigned; self.asid = asid; self.guestPage = guestPage; self.largePage = largePage
        self.validated = validated; self.immutable = immutable
    }
}

/// What a confidential VM's memory path did so far.
public struct ConfidentialCounters: Sendable, Codable, Equatable {
    /// Pages decrypted into the working set, and written back encrypted.
    public var decryptions: UInt64 = 0
    public var encryptions: UInt64 = 0
    /// Working-set lines evicted to make room.
    public var evictions: UInt64 = 0
    /// Frames switched between private and shared views (the guest's C-bit changed).
    public var conversions: UInt64 = 0
    /// #VC exceptions raised for reverse-map violations.
    public var rmpViolations: UInt64 = 0
    /// PVALIDATE instructions executed, and pages they changed.
    public var validations: UInt64 = 0
    public var pagesValidated: UInt64 = 0
    public init() {}
}

/// An engine that can run a VM with encrypted memory. Set up through
/// `VMConfig.confidential`; the launch sequence (VMM, before any vCPU runs) is
/// `launchUpdate` for the measured pages, then `finishLaunch`.
public protocol EncryptedMemory: VM {
    var confidentialMode: ConfidentialMode? { get }
    /// LAUNCH_UPDATE_DATA: encrypts guest pages `pages` in place (their plaintext is in
    /// RAM now); with SNP they are assigned to the guest, validated and immutable.
    func launchUpdate(pages: Range<Int>) throws
    /// Encrypts every other private page (as zeros the guest reads back) and, with SNP,
    /// assigns it unvalidated: the guest PVALIDATEs it before use. Pages in `shared`
    /// stay plaintext and owned by the host.
    func finishLaunch(shared: Range<Int>) throws
    /// Writes the decrypted working set back, encrypted, and drops it (pause, snapshot).
    /// vCPUs out of `run()`.
    func flushWorkingSet()
    var confidentialCounters: ConfidentialCounters { get }
    /// The reverse-map entry of host frame `frame` (nil without SNP).
    func rmpEntry(frame: Int) -> RMPEntry?
    /// RMPUPDATE: gives `frame` to the guest for `guestPage` (unvalidated) or, with nil,
    /// back to the host. Throws for an immutable entry. vCPUs out of `run()`.
    func rmpUpdate(frame: Int, guestPage: Int?) throws
}

/// A confidential VM's launch measurement did not match, or the request is invalid.
public struct ConfidentialError: Error, Equatable, Sendable, CustomStringConvertible {
    public let message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}
