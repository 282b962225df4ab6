import CHost
import Synchronization
import VirtCore
#if canImport(Glibc)
import Glibc
#endif

public enum CopyOnWriteError: Error, CustomStringConvertible {
    case userfaultfdUnavailable(errno: Int32)
    case writeProtectFailed(operation: String, errno: Int32)

    public var description: String {
        switch self {
        case let .userfaultfdUnavailable(err):
            return "userfaultfd write protection is unavailable (\(String(cString: strerror(err)))); it needs Linux ≥ 5.19 and "
                + "CAP_SYS_PTRACE (or vm.unprivileged_userfaultfd=1)"
        case let .writeProtectFailed(op, err):
            return "\(op) failed: \(String(cString: strerror(err)))"
        }
    }
}

/// Catches the first guest write to each page after `protectAll()`: the writing vCPU is
/// held until `CopyOnWriteSession.firstWrite(page:)` has saved the page, then the page is
/// made writable again.
protocol WriteProtection: AnyObject, Sendable {
    func protectAll() throws
    /// Makes `pages` writable again (from any thread).
    func unprotect(pages: Range<Int>)
    /// Unprotects everything and stops any helper thread.
    func finish()
    /// How writes are caught, for reports.
    var mechanism: String { get }
}

/// KVM (and any engine writing through the host mapping): userfaultfd write protection on
/// the memfd mapping. A guest write — by the vCPU through KVM's page tables, or by a device
/// thread — faults in the host kernel; a handler thread saves the page and lifts the
/// protection, which wakes the writer.
// SAFETY: `thread` is set in protectAll() and joined in finish(), both on the snapshot's thread; the fds are immutable.
final class UserfaultWriteProtection: WriteProtection, @unchecked Sendable {
    let memory: GuestMemory
    private let uffd: Int32
    private let stopFD: Int32
    private var thread: HostThread?
    private let onFault: @Sendable (Int) -> Void
    var mechanism: String { "userfaultfd write protection" }

    init(memory: GuestMemory, onFault: @escaping @Sendable (Int) -> Void) throws {
        self.memory = memory
        self.onFault = onFault
        let fd = host_uffd_open(1)
        guard fd >= 0 else { throw CopyOnWriteError.userfaultfdUnavailable(errno: -fd) }
        let rc = host_uffd_register(fd, memory.base, memory.size, 1, 0)
        guard rc == 0 else {
            close(fd)
            throw CopyOnWriteError.userfaultfdUnavailable(errno: -rc)
        }
        uffd = fd
        stopFD = host_eventfd()
    }

    deinit {
        finish()
        close(uffd)
        if stopFD >= 0 { close(stopFD) }
    }

    func protectAll() throws {
        let rc = host_uffd_writeprotect(uffd, memory.base, memory.size, 1)
        guard rc == 0 else { throw CopyOnWriteError.writeProtectFailed(operation: "UFFDIO_WRITEPROTECT", errno: -rc) }
        let base = UInt(bitPattern: memory.base)
        thread = HostThread(name: "cow-faults") { [uffd, stopFD, onFault] in
            var address: UInt64 = 0
            var isWrite: Int32 = 0, isWP: Int32 = 0
            while true {
                let r = host_uffd_next_fault(uffd, stopFD, -1, &address, &isWrite, &isWP)
                if r != 1 { return }
                onFault(Int((UInt(address) - base) >> 12))
            }
        }
    }

    func unprotect(pages: Range<Int>) {
        // Clearing WP also wakes a thread waiting on the pages.
        _ = host_uffd_writeprotect(uffd, memory.base + pages.lowerBound * 4096, UInt64(pages.count * 4096), 0)
    }

    func finish() {
        guard let t = thread else { return }
        _ = host_uffd_writeprotect(uffd, memory.base, memory.size, 0)
        _ = host_eventfd_signal(stopFD)
        t.join()
        thread = nil
        _ = host_uffd_unregister(uffd, memory.base, memory.size)
    }
}

/// The software engine, as the text describes it: write permission is cleared in the
/// second-level page table; a guest write is an EPT violation (a `.memoryFault` exit),
/// handled on the vCPU's thread by saving the page and restoring the permission.
// SAFETY: holds only the table, which synchronises its own changes.
final class SecondLevelWriteProtection: WriteProtection, @unchecked Sendable {
    let table: any SecondLevelTranslation
    var mechanism: String { "second-level page table write protection (EPT violations)" }

    init(table: any SecondLevelTranslation) { self.table = table }

    func protectAll() throws { table.setPermissions([.read, .execute], pages: 0..<table.secondLevelPageCount) }
    func unprotect(pages: Range<Int>) { table.setPermissions(.all, pages: pages) }
    func finish() { table.setPermissions(.all, pages: 0..<table.secondLevelPageCount) }
}

/// One copy-on-write snapshot in progress: every page is saved exactly once, as it was at
/// the snapshot point — by the writer as it streams pages in order, or earlier, by the
/// first guest write to it (the original goes to a side store the writer drains).
// SAFETY: `protection` is set once before write protection is armed; all other state is in a Mutex.
final class CopyOnWriteSession: @unchecked Sendable {
    let memory: GuestMemory
    var protection: (any WriteProtection)!
    private struct State {
        var saved: [Bool]
        var copies: [Int: [UInt8]] = [:]
        var faults: UInt64 = 0
        var bytesCopied: UInt64 = 0
    }
    private let state: Mutex<State>

    /// Pages that were holes of the RAM's memfd at the snapshot point: zeros then, so the
    /// writer neither reads them (a read would allocate them) nor needs them protected.
    private let holes: DirtyBitmap

    /// Call with the vCPUs paused (the snapshot point).
    init(memory: GuestMemory) {
        self.memory = memory
        state = Mutex(State(saved: [Bool](repeating: false, count: Int(memory.size / 4096))))
        holes = MigrationPageCodec.allocatedPages(of: memory).complement
    }

    /// A guest write is about to change `page` for the first time since the snapshot point.
    func firstWrite(page: Int) {
        state.withLock { s in
            guard page >= 0, page < s.saved.count else { return }
            s.faults += 1
            if !s.saved[page] {
                s.copies[page] = Array(UnsafeRawBufferPointer(start: memory.base + page * 4096, count: 4096))
                s.saved[page] = true
                s.bytesCopied += 4096
            }
        }
        protection.unprotect(pages: page..<(page + 1))
    }

    /// The snapshot-point contents of `pages`, for the writer (in order, a chunk at a time:
    /// one lock and one unprotect call per chunk, not per page).
    func contents(pages: Range<Int>, into buffer: UnsafeMutableRawBufferPointer) {
        state.withLock { s in
            for (k, page) in pages.enumerated() {
                let slot = buffer.baseAddress! + k * 4096
                if let copy = s.copies.removeValue(forKey: page) {
                    copy.withUnsafeBytes { slot.copyMemory(from: $0.baseAddress!, byteCount: 4096) }
                } else if holes[page] {
                    slot.initializeMemory(as: UInt8.self, repeating: 0, count: 4096)
                    s.saved[page] = true
                } else {
                    // Still protected, so still the snapshot-point contents.
                    slot.copyMemory(from: memory.base + page * 4096, byteCount: 4096)
                    s.saved[page] = true
                }
            }
        }
        // Pages saved earlier by a first write are writable already; lifting their
        // protection again is harmless and keeps this one call.
        protection.unprotect(pages: pages)
    }

    var faults: UInt64 { state.withLock { $0.faults } }
    var bytesCopied: UInt64 { state.withLock { $0.bytesCopied } }
}
