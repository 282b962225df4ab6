import Synchronization
import VirtCore

/// The model of EPT: the second translation stage, guest-physical → host memory, with
/// read/write/execute permissions and accessed/dirty flags for every 4 KiB page of guest
/// RAM. Each guest page maps to a host frame of the VM's memory — itself by default; page
/// deduplication points several guest pages at one frame (read-only, so the first write is
/// an EPT violation that breaks the sharing).
///
/// Like EPT, it is consulted when a translation is cached: a vCPU's TLB entry allows
/// writes only after the page's dirty flag was set by a write, so later writes to the page
/// cost nothing. Changing permissions or clearing flags therefore needs the cached
/// translations dropped — INVEPT: `invalidate()`, which every vCPU of the VM honours when
/// it next enters `run()`. Make such changes while the vCPUs are out of `run()` (stopped
/// at an exit), as a VMM pauses vCPUs around INVEPT.
///
/// A guest access the permissions forbid is an EPT violation: the instruction is not
/// executed and `run()` returns `.memoryFault(gpa:access:)`; it restarts on the next
/// `run()`, after the VMM has changed the permissions (copy-on-write, say).
// SAFETY: permissions and frames change under `changeLock` (vCPUs see them after the epoch bump forces a TLB flush at their next run); accessed/dirty flags are byte stores any vCPU may make, collected by the VMM while vCPUs are out of run().
public final class SecondLevelPageTable: @unchecked Sendable {
    public static let pageSize: UInt64 = 4096
    public let pageCount: Int

    /// Per page: `Permissions` bits. Written by the VMM only.
    let permissions: UnsafeMutablePointer<UInt8>
    /// Per page: 1 once read or written through a translation since last cleared. Separate
    /// byte arrays so concurrent vCPUs set flags with plain stores (no read-modify-write).
    let accessed: UnsafeMutablePointer<UInt8>
    let dirty: UnsafeMutablePointer<UInt8>
    /// Per page: the host frame (page number within the VM's RAM) it maps to.
    let frames: UnsafeMutablePointer<UInt32>
    /// Pages mapped to a frame other than their own (0: identity everywhere, fast path).
    private let remappedCount = Atomic<Int>(0)
    private let epochCounter = Atomic<UInt64>(0)
    /// Bumped by changes that take something away (a permission, a frame, a dirty flag):
    /// what shadow tables built from this table must be rebuilt after. Lifting a
    /// restriction leaves shadow entries merely stricter than needed.
    private let restrictionCounter = Atomic<UInt64>(0)
    var restrictionEpoch: UInt64 { restrictionCounter.load(ordering: .acquiring) }
    /// Pages that lack a permission, so fills can skip the permission check when zero.
    private let restrictedCount = Atomic<Int>(0)
    /// Serialises permission changes (a snapshot writer and vCPU threads make them).
    private let changeLock = Mutex(())
    @inline(__always) var restrictedPages: Int { restrictedCount.load(ordering: .relaxed) }
    /// The largest page the table maps with (a walk of it reads 4, 3 or 2 levels) and, per
    /// 2 MiB and 1 GiB region, the pages whose permissions or frame differ from the identity
    /// RWX default — a region with any cannot be one large page and is split.
    var largestPage: SecondLevelPageSize = .size4K
    /// Mode-based execute control: execution through a user-mode guest mapping needs
    /// `.userExecute`, through a supervisor-mode one `.execute`. Off: `.execute` for both.
    var modeBasedExecute = false

    /// The permission bit an instruction fetch needs.
    /// Call after changing `modeBasedExecute` (it can take execution away).
    func modeChanged() {
        restrictionCounter.add(1, ordering: .releasing)
        invalidate()
    }

    @inline(__always) func executeBit(userAddress: Bool) -> UInt8 {
        modeBasedExecute && userAddress ? PagePermissions.userExecute.rawValue : PagePermissions.execute.rawValue
    }
    private let split2M: UnsafeMutablePointer<UInt16>
    private let split1G: UnsafeMutablePointer<UInt32>

    public typealias Permissions = PagePermissions

    init(ramSize: UInt64) {
        pageCount = Int((ramSize + Self.pageSize - 1) / Self.pageSize)
        let n = max(pageCount, 1)
        permissions = .allocate(capacity: n)
        permissions.initialize(repeating: Permissions.all.rawValue, count: n)
        accessed = .allocate(capacity: n)
        accessed.initialize(repeating: 0, count: n)
        dirty = .allocate(capacity: n)
        dirty.initialize(repeating: 0, count: n)
        frames = .allocate(capacity: n)
        for i in 0..<n { (frames + i).initialize(to: UInt32(i)) }
        split2M = .allocate(capacity: (n + 511) / 512)
        split2M.initialize(repeating: 0, count: (n + 511) / 512)
        split1G = .allocate(capacity: (n + 262_143) / 262_144)
        split1G.initialize(repeating: 0, count: (n + 262_143) / 262_144)
    }

    /// Entries a walk of this table reads to translate `gpa` (EPT: 4 levels, fewer where a
    /// large page maps it).
    @inline(__always)
    func walkLevels(_ gpa: UInt64) -> UInt64 {
        switch largestPage {
        case .size4K: return 4
        case .size2M: return split2M[Int(gpa >> 21)] == 0 ? 3 : 4
        case .size1G: return split1G[Int(gpa >> 30)] == 0 ? 2 : (split2M[Int(gpa >> 21)] == 0 ? 3 : 4)
        }
    }

    /// Counts page `page` into (or out of) its regions' split counts. Under `changeLock`.
    private func noteSplit(page: Int, _ delta: Int) {
        guard delta != 0 else { return }
        split2M[page >> 9] = UInt16(Int(split2M[page >> 9]) + delta)
        split1G[page >> 18] = UInt32(Int(split1G[page >> 18]) + delta)
    }

    private func isSplit(page: Int) -> Bool { permissions[page] != Permissions.all.rawValue || Int(frames[page]) != page }

    deinit {
        permissions.deallocate()
        accessed.deallocate()
        dirty.deallocate()
        frames.deallocate()
        split2M.deallocate()
        split1G.deallocate()
    }

    /// The host address (offset in the VM's RAM) of guest-physical `gpa` (inside RAM).
    @inline(__always)
    func hostAddress(_ gpa: UInt64) -> UInt64 {
        if remappedCount.load(ordering: .relaxed) == 0 { return gpa }
        return UInt64(frames[Int(gpa >> 12)]) << 12 | (gpa & 0xFFF)
    }

    /// The host frame `page` maps to.
    public func frame(of page: Int) -> Int { Int(frames[page]) }

    /// Maps guest `page` onto host `frame` with `permissions` (dedup: read and execute
    /// only, so a write breaks the sharing), then invalidates. vCPUs out of `run()`.
    public func map(page: Int, toFrame frame: Int, permissions p: Permissions) {
        precondition(page >= 0 && page < pageCount && frame >= 0 && frame < pageCount, "pages outside guest RAM")
        changeLock.withLock { _ in
            let was = Int(frames[page]) != page, now = frame != page
            remappedCount.add((now ? 1 : 0) - (was ? 1 : 0), ordering: .releasing)
            let wasSplit = isSplit(page: page)
            if Int(frames[page]) != frame { restrictionCounter.add(1, ordering: .releasing) }
            frames[page] = UInt32(frame)
            noteSplit(page: page, (isSplit(page: page) ? 1 : 0) - (wasSplit ? 1 : 0))
        }
        setPermissions(p, pages: page..<(page + 1))
    }

    /// Bumped by `invalidate()`; vCPUs compare it with the value their TLB was filled under.
    var epoch: UInt64 { epochCounter.load(ordering: .acquiring) }

    /// INVEPT: every vCPU drops its cached translations when it next enters `run()`.
    public func invalidate() { epochCounter.add(1, ordering: .releasing) }

    public func permissions(page: Int) -> Permissions {
        precondition(page >= 0 && page < pageCount, "page \(page) outside guest RAM")
        return Permissions(rawValue: permissions[page])
    }

    /// Sets the permissions of `pages`, then invalidates. Any thread: lifting a restriction
    /// takes effect at once (a stale cached translation is only more restrictive, and the
    /// walk it causes sees the new permission); adding one needs the vCPUs out of `run()`.
    public func setPermissions(_ p: Permissions, pages: Range<Int>) {
        precondition(pages.lowerBound >= 0 && pages.upperBound <= pageCount, "pages outside guest RAM")
        changeLock.withLock { _ in
            var delta = 0
            var restricts = false
            for i in pages {
                if permissions[i] & ~p.rawValue != 0 { restricts = true }
                let was = permissions[i] != Permissions.all.rawValue
                let now = p != .all
                delta += (now ? 1 : 0) - (was ? 1 : 0)
                let wasSplit = isSplit(page: i)
                permissions[i] = p.rawValue
                noteSplit(page: i, (isSplit(page: i) ? 1 : 0) - (wasSplit ? 1 : 0))
            }
            restrictedCount.add(delta, ordering: .releasing)
            if restricts { restrictionCounter.add(1, ordering: .releasing) }
        }
        invalidate()
    }

    public func isDirty(page: Int) -> Bool { page >= 0 && page < pageCount && dirty[page] != 0 }
    public func isAccessed(page: Int) -> Bool { page >= 0 && page < pageCount && accessed[page] != 0 }

    /// The dirty flags of `pages` as a bitmap over all of RAM, clearing them (and the
    /// accessed flags when `clearAccessed`), then invalidates so the next write to each
    /// page sets its flag again.
    public func collectDirty(pages: Range<Int>? = nil, clearAccessed: Bool = false) -> DirtyBitmap {
        let range = pages ?? 0..<pageCount
        precondition(range.lowerBound >= 0 && range.upperBound <= pageCount, "pages outside guest RAM")
        var bitmap = DirtyBitmap(pageCount: pageCount)
        for i in range {
            if dirty[i] != 0 {
                bitmap[i] = true
                dirty[i] = 0
            }
            if clearAccessed { accessed[i] = 0 }
        }
        restrictionCounter.add(1, ordering: .releasing)
        invalidate()
        return bitmap
    }
}
