import Synchronization
import VirtCore

/// The status device of scenario S1, offered in two forms with the same registers: a
/// 32-bit status word the device publishes and a control register the guest writes
/// commands to (each command: its sequence number).
///
/// Port form (`StatusDevice` on the I/O bus): every status read and control write is a
/// VM exit, emulated here. Page form (`StatusPage`): the registers live on an ordinary
/// page of guest RAM; the guest touches them without exits, and the VMM learns of
/// control writes only when it scans the page's dirty state on a timer.
public final class StatusDevice: PortIODevice, Sendable {
    public static let firstPort: UInt16 = 0x510
    public static let portCount = 8
    /// Offsets: status (read), control (write).
    public static let statusOffset: UInt16 = 0, controlOffset: UInt16 = 4

    public var name: String { "status-device" }
    private let state = Mutex((status: UInt32(0), handled: UInt64(0), lastCommand: UInt32(0)))

    public init() {}

    /// Commands handled so far.
    public var handledCommands: UInt64 { state.withLock { $0.handled } }
    public var lastCommand: UInt32 { state.withLock { $0.lastCommand } }

    public func portRead(offset: UInt16, size: UInt8) -> UInt32 {
        guard offset == Self.statusOffset else { return 0xFFFF_FFFF }
        return state.withLock { $0.status }
    }

    public func portWrite(offset: UInt16, size: UInt8, value: UInt32) {
        guard offset == Self.controlOffset else { return }
        state.withLock {
            $0.handled += 1
            $0.lastCommand = value
            $0.status = UInt32(truncatingIfNeeded: $0.handled)  // status: commands done
        }
    }
}

/// The page form of the status device: `status` (device → guest) at offset 0, `handled`
/// (device → guest) at 4, `control` (guest → device: commands issued so far) at 8.
// SAFETY: its counters change only in scan(), which the VMM calls from one thread (vCPU 0 at its timer exits).
public final class StatusPage: @unchecked Sendable {
    public static let statusOffset: UInt64 = 0, handledOffset: UInt64 = 4, controlOffset: UInt64 = 8

    public let memory: GuestMemory
    /// Guest-physical address of the page (4 KiB aligned, inside RAM).
    public let address: UInt64
    /// Commands handled so far, and scans that found the page written.
    public private(set) var handledCommands: UInt64 = 0
    public private(set) var scans: UInt64 = 0
    public private(set) var dirtyScans: UInt64 = 0

    public init(memory: GuestMemory, address: UInt64) throws {
        precondition(address % 4096 == 0, "the status page is page-aligned")
        self.memory = memory
        self.address = address
        try memory.fill(0, at: address, count: 4096)
    }

    public var pageNumber: Int { Int(address / 4096) }

    /// One timer tick: if the page was written since the last scan, handles the commands
    /// issued since then and publishes the new status. Returns the commands handled now.
    /// The control word is a count, so commands written between two scans are not lost:
    /// they are handled together.
    @discardableResult
    public func scan(pageWasWritten: Bool) throws -> UInt64 {
        scans += 1
        guard pageWasWritten else { return 0 }
        dirtyScans += 1
        let issued = UInt64(try memory.load(UInt32.self, at: address + Self.controlOffset))
        guard issued > handledCommands else { return 0 }
        let new = issued - handledCommands
        handledCommands = issued
        try memory.store(UInt32(truncatingIfNeeded: handledCommands), at: address + Self.statusOffset)
        try memory.store(UInt32(truncatingIfNeeded: handledCommands), at: address + Self.handledOffset)
        return new
    }
}
