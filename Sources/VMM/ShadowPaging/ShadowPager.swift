import Synchronization
import VirtCore

/// What the shadow pager did, per kind of work: exits (count and VMM nanoseconds) and the
/// shadow-table bookkeeping behind them.
public struct ShadowPagingStatistics: Sendable, Equatable, Codable {
    /// Guest writes to a write-protected guest page table, emulated by the VMM.
    public var pageTableWrites = ExitCounter()
    /// CR3 (and CR0/CR4/EFER) loads.
    public var contextSwitches = ExitCounter()
    /// INVLPG.
    public var invalidations = ExitCounter()
    /// Shadow misses (or write traps on pages not yet dirtied) filled from the guest tables.
    public var fills = ExitCounter()
    /// Faults the guest's own tables raise, reflected into the guest as #PF.
    public var guestPageFaults = ExitCounter()
    /// Second-level violations found while filling (handed to the VMM's memory-fault handler).
    public var secondLevelViolations: UInt64 = 0
    /// Shadow table pages made, emptied on a guest table write, and dropped because the
    /// guest kept writing a page it no longer used as a table.
    public var shadowPagesCreated: UInt64 = 0
    public var shadowPagesZapped: UInt64 = 0
    public var shadowPagesUnshadowed: UInt64 = 0
    /// Every shadow table dropped at once (pool full, second-level change, paging-mode change).
    public var fullResets: UInt64 = 0
    /// VMM time reading guest page-table entries on fills.
    public var guestTableReads: UInt64 = 0

    public init() {}

    /// Exits the pager handled.
    public var exits: UInt64 {
        pageTableWrites.count + contextSwitches.count + invalidations.count + fills.count + guestPageFaults.count
    }
    public var nanoseconds: UInt64 {
        pageTableWrites.nanoseconds + contextSwitches.nanoseconds + invalidations.nanoseconds + fills.nanoseconds + guestPageFaults.nanoseconds
    }
}

/// The VMM's half of shadow paging (scenario S5): keeps, per guest page table, a shadow
/// table in a `ShadowPageTablePool` that maps guest-virtual straight to host memory, and
/// answers the engine's `.shadowPaging` exits.
///
/// - A shadow miss: the pager walks the guest's tables as the CPU would (setting accessed
///   and dirty bits), checks the second level, and fills the path; a fault of the guest's
///   own tables is injected as #PF with its error code and CR2.
/// - Every guest page-table page that has a shadow is write-protected (its leaves carry
///   `writeTrap`): a write exits, the engine executes that one instruction for the VMM
///   (`emulateTrappedWrite`), and the pager then empties the shadows of the written table.
///   A page written four times without being walked is taken to be a table no more and
///   loses its shadow (and protection).
/// - CR3 loads pick (or build) the shadow root for the new CR3; INVLPG drops the shadow
///   leaf of the address.
/// Shadow pages are shared by all vCPUs; one lock serialises the pager.
public final class ShadowPager: @unchecked Sendable {
    // SAFETY: every mutable field is touched only under `lock` (the vCPU threads' exits).
    private typealias P = ShadowPageTablePool
    static let physicalMask: UInt64 = 0x0000_00FF_FFFF_F000  // 40-bit guest-physical addresses, as the engine
    static let floodThreshold = 4

    public let pool: ShadowPageTablePool
    private let vm: any ShadowPagingVM
    private let memory: GuestMemory
    private let lock = Mutex(())

    /// A shadow page: the guest table it mirrors (gfn and level 3…0), or for a direct page
    /// (a guest large page split into 4 KiB shadow leaves) the region's base and level; the
    /// entry slots (page × 512 + index) that point at it.
    private struct PageInfo {
        var gfn: UInt64
        var level: Int
        var direct: Bool
        var parents: [Int] = []
        var writesSinceUse = 0
    }
    private var info: [PageInfo?]
    private var free: [Int]
    /// Pages dropped since the last TLB shootdown: a vCPU may still be walking through
    /// them, so they are reused only after every vCPU has flushed (`shootdown`).
    private var retired: [Int] = []
    /// Non-direct shadow pages by (gfn << 2 | level), and the shadow pages of each protected gfn.
    private var byKey: [UInt64: Int] = [:]
    private var shadowsOf: [UInt64: [Int]] = [:]
    /// Per gfn: shadow leaf slots that map it (with the host frame they mapped), possibly
    /// stale — checked when the gfn needs protecting.
    private var leavesOf: [UInt64: [(slot: Int, host: UInt64)]] = [:]
    /// Per vCPU: the root it walks.
    private var roots: [Int]
    private var builtGeneration: UInt64
    private var builtNoExecute: Bool?
    private var stats = ShadowPagingStatistics()
    /// Per vCPU: the last fault filled and how often it came straight back.
    /// (linear, error code, shadow epoch) of the last fill; the epoch counts full resets,
    /// after which the same fault is expected again.
    private var lastFault: [(UInt64, UInt32, UInt64)?]
    private var repeats: [Int]
    static let repeatLimit = 8

    public init(vm: any ShadowPagingVM, vcpuCount: Int, poolPages: Int = 8192) {
        self.vm = vm
        memory = vm.memory
        pool = ShadowPageTablePool(pageCount: poolPages)
        info = Array(repeating: nil, count: poolPages)
        free = Array((1..<poolPages).reversed())
        roots = Array(repeating: 0, count: vcpuCount)
        lastFault = Array(repeating: nil, count: vcpuCount)
        repeats = Array(repeating: 0, count: vcpuCount)
        builtGeneration = vm.secondLevelGeneration
    }

    public var statistics: ShadowPagingStatistics { lock.withLock { _ in stats } }

    /// What the run loop does after the pager handled an exit.
    public enum Outcome: Sendable, Equatable {
        case resume
        /// The second level forbids an access the guest's tables allow: an EPT violation for
        /// the VMM's memory-fault handler.
        case secondLevelViolation(gpa: UInt64, access: MemoryAccessKind)
    }

    /// Handles one `.shadowPaging` exit of `vcpu` (on its thread).
    public func handle(_ event: ShadowPagingEvent, vcpu: any ShadowPagingVCPU) -> Outcome {
        let t0 = HostClock.ticks()
        return lock.withLock { _ in
            let ctx = vcpu.pagingContext
            revalidate(ctx)
            var outcome = Outcome.resume
            let kind: WritableKeyPath<ShadowPagingStatistics, ExitCounter>
            switch event {
            case .contextSwitch:
                useRoot(for: ctx, vcpu: vcpu)
                kind = \.contextSwitches
            case let .invalidatePage(linear):
                invalidate(linear, vcpu: vcpu)
                kind = \.invalidations
            case let .pageFault(linear, errorCode):
                useRoot(for: ctx, vcpu: vcpu)
                (kind, outcome) = fault(linear, errorCode: errorCode, ctx: ctx, vcpu: vcpu)
            }
            stats[keyPath: kind].add(nanoseconds: HostClock.nanoseconds(ticks: HostClock.ticks() &- t0))
            return outcome
        }
    }

    // MARK: Roots and resets

    /// Drops every shadow if the second level or the guest's NX setting changed since they were made.
    private func revalidate(_ ctx: GuestPagingContext) {
        let generation = vm.secondLevelGeneration
        if generation != builtGeneration || (builtNoExecute != nil && builtNoExecute != ctx.noExecuteEnabled) {
            resetAll()
            builtGeneration = generation
        }
        builtNoExecute = ctx.noExecuteEnabled
    }

    private func useRoot(for ctx: GuestPagingContext, vcpu: any ShadowPagingVCPU) {
        guard ctx.pagingEnabled else { return }
        var root = byKey[Self.key(ctx.cr3 & Self.physicalMask, level: 3)]
        if root == nil {
            root = shadowPage(gfn: ctx.cr3 & Self.physicalMask, level: 3)
            if root == nil { resetAll(); root = shadowPage(gfn: ctx.cr3 & Self.physicalMask, level: 3) }
        }
        guard let r = root else { return }
        roots[vcpu.id] = r
        if vcpu.shadowRoot != r { vcpu.shadowRoot = r }
    }

    /// Empties and frees every shadow page except the roots vCPUs use (emptied only).
    private func resetAll() {
        let inUse = Set(roots.filter { $0 != 0 })
        for page in 1..<pool.pageCount where info[page] != nil {
            pool.clear(page: page)
            if inUse.contains(page) {
                info[page]!.parents = []
            } else {
                info[page] = nil
                retired.append(page)
            }
        }
        byKey = byKey.filter { inUse.contains($0.value) }
        shadowsOf = shadowsOf.mapValues { $0.filter(inUse.contains) }.filter { !$0.value.isEmpty }
        leavesOf = [:]
        stats.fullResets += 1
        shootdown()
    }

    /// Every vCPU drops its cached translations; then retired pages may be reused.
    private func shootdown() {
        vm.flushShadowTranslations()
        free.append(contentsOf: retired)
        retired.removeAll(keepingCapacity: true)
    }

    private static func key(_ gfn: UInt64, level: Int) -> UInt64 { gfn | UInt64(level) }

    /// The shadow page mirroring guest table `gfn` at `level`, made (and the gfn
    /// write-protected) if there is none; nil when the pool is full.
    private func shadowPage(gfn: UInt64, level: Int) -> Int? {
        if let p = byKey[Self.key(gfn, level: level)] { return p }
        guard let p = allocate(PageInfo(gfn: gfn, level: level, direct: false)) else { return nil }
        byKey[Self.key(gfn, level: level)] = p
        let newlyProtected = shadowsOf[gfn] == nil
        shadowsOf[gfn, default: []].append(p)
        if newlyProtected { protect(gfn) }
        return p
    }

    private func allocate(_ page: PageInfo) -> Int? {
        guard let p = free.popLast() else { return nil }
        pool.clear(page: p)
        info[p] = page
        stats.shadowPagesCreated += 1
        return p
    }

    /// Sets `writeTrap` on every shadow leaf that maps `gfn`, and shoots down the TLBs
    /// (one may still hold a writable translation from a leaf since dropped).
    private func protect(_ gfn: UInt64) {
        guard let leaves = leavesOf[gfn] else { return }
        for (slot, host) in leaves {
            let e = pool.entries[slot]
            if e & P.present != 0 && e & P.frameMask == host && e & P.writeTrap == 0 {
                pool.entries[slot] = e | P.writeTrap
            }
        }
        leavesOf[gfn] = nil
        shootdown()
    }

    /// Remembers that shadow leaf `slot` maps `gfn` (pruning stale records now and then).
    private func noteLeaf(_ slot: Int, gfn: UInt64, host: UInt64) {
        var list = leavesOf[gfn] ?? []
        if list.count >= 16 && list.count.nonzeroBitCount == 1 {
            list.removeAll { pool.entries[$0.slot] & P.present == 0 || pool.entries[$0.slot] & P.frameMask != $0.host }
        }
        list.append((slot, host))
        leavesOf[gfn] = list
    }

    // MARK: Guest walk and fill

    /// One level of a successful guest walk: where the entry is and what it says.
    private struct GuestLevel {
        var level: Int
        var entry: UInt64
    }

    private func fault(_ linear: UInt64, errorCode: UInt32, ctx: GuestPagingContext, vcpu: any ShadowPagingVCPU)
        -> (WritableKeyPath<ShadowPagingStatistics, ExitCounter>, Outcome) {
        let write = errorCode & 2 != 0, user = errorCode & 4 != 0, execute = errorCode & 0x10 != 0
        let implicit = errorCode & ShadowPagingEvent.implicitAccess != 0
        // The same fault again right after a fill: the engine saw something this walk did
        // not (a model mismatch must not spin the vCPU forever) — the guest gets the #PF.
        let epoch = stats.fullResets
        let repeated = lastFault[vcpu.id].map { $0.0 == linear && $0.1 == errorCode && $0.2 == epoch } ?? false
        repeats[vcpu.id] = repeated ? repeats[vcpu.id] + 1 : 0
        lastFault[vcpu.id] = (linear, errorCode, epoch)
        var access: MemoryAccessKind = write ? .write : execute ? .execute : .read
        // The guest walk, as the CPU makes it (A bits on the way down, A/D on the leaf).
        var table = ctx.cr3 & Self.physicalMask
        var levels: [GuestLevel] = []
        levels.reserveCapacity(4)
        var writable = true, userOK = true, noExecute = false
        let nxe = ctx.noExecuteEnabled
        var reserved: UInt64 = ~((1 << 40) - 1) & 0x7FFF_FFFF_FFFF_FFFF
        if !nxe { reserved |= 1 << 63 }
        func guestFault(present: Bool, reserved rsvd: Bool = false) -> (WritableKeyPath<ShadowPagingStatistics, ExitCounter>, Outcome) {
            var code = errorCode & (2 | 4 | 0x10)
            if present { code |= 1 }
            if rsvd { code |= 8 }
            lastFault[vcpu.id] = nil
            vcpu.injectPageFault(address: linear, errorCode: code)
            return (\.guestPageFaults, .resume)
        }
        if repeats[vcpu.id] >= Self.repeatLimit { return guestFault(present: true) }
        var level = 3
        var gpa: UInt64 = 0
        var leafLevel = 0
        while true {
            let entryGPA = table + ((linear >> UInt64(12 + 9 * level)) & 0x1FF) * 8
            guard let host = vm.hostOffset(of: entryGPA), let entry: UInt64 = try? memory.load(at: host) else {
                return guestFault(present: false)
            }
            stats.guestTableReads += 1
            guard entry & 1 != 0 else { return guestFault(present: false) }
            let large = level >= 1 && level <= 2 && entry & 0x80 != 0
            var rsvd = entry & reserved
            if level == 3 && entry & 0x80 != 0 { rsvd |= 0x80 }
            if large { rsvd |= entry & (level == 2 ? 0x3FFF_E000 : 0x1F_E000) }
            if rsvd != 0 { return guestFault(present: true, reserved: true) }
            writable = writable && entry & 2 != 0
            userOK = userOK && entry & 4 != 0
            noExecute = noExecute || (nxe && entry >> 63 != 0)
            if level == 0 || large {
                if user && !userOK { return guestFault(present: true) }
                if write && !writable && (user || ctx.writeProtect) { return guestFault(present: true) }
                if execute && noExecute { return guestFault(present: true) }
                if !user && userOK && execute && ctx.smep { return guestFault(present: true) }
                if !user && userOK && !execute && ctx.smap && (!ctx.alignmentCheck || implicit) { return guestFault(present: true) }
                let newEntry = entry | 0x20 | (write ? 0x40 : 0)
                if newEntry != entry, let o = setGuestEntry(entryGPA, newEntry) { return (\.fills, o) }
                levels.append(GuestLevel(level: level, entry: newEntry))
                let mask: UInt64 = (1 << UInt64(12 + 9 * level)) - 1
                gpa = (newEntry & Self.physicalMask & ~mask) | (linear & mask)
                leafLevel = level
                break
            }
            if entry & 0x20 == 0, let o = setGuestEntry(entryGPA, entry | 0x20) { return (\.fills, o) }
            levels.append(GuestLevel(level: level, entry: entry | 0x20))
            table = entry & Self.physicalMask
            level -= 1
        }
        // The second level, for the access and for what later accesses may skip.
        let gfn = gpa & ~0xFFF
        var hostFrame = gfn, slWritable = false, slExecutable = false
        switch vm.lookUpSecondLevel(gpa, access: access, userAddress: userOK) {
        case let .violation(g, a):
            stats.secondLevelViolations += 1
            return (\.fills, .secondLevelViolation(gpa: g, access: a))
        case .notRAM:
            access = []
        case let .host(offset, w, x):
            hostFrame = offset; slWritable = w; slExecutable = x
        }
        let protected = shadowsOf[gfn] != nil && !access.isEmpty
        let dirty = levels.last!.entry & 0x40 != 0
        var leaf = hostFrame | P.present | (levels.last!.entry & (P.writable | P.user))
        if levels.last!.entry >> 63 != 0 && nxe { leaf |= P.noExecute }
        if !access.isEmpty {
            if protected || !dirty || !slWritable { leaf |= P.writeTrap }
            if !slExecutable { leaf |= P.noExecute }
        } else if !dirty {
            leaf |= P.writeTrap  // MMIO: the first write must still set the guest's dirty bit
        }
        var slot = install(linear, root: roots[vcpu.id], levels: levels, leafLevel: leafLevel, leaf: leaf, nxe: nxe)
        if slot == nil {
            resetAll()
            useRoot(for: ctx, vcpu: vcpu)
            slot = install(linear, root: roots[vcpu.id], levels: levels, leafLevel: leafLevel, leaf: leaf, nxe: nxe)
        }
        if let s = slot, !access.isEmpty, !protected { noteLeaf(s, gfn: gfn, host: hostFrame) }
        guard write && protected else { return (\.fills, .resume) }
        // A write to a guest page table: the engine executes it for us, then the shadows
        // of that table are emptied (refilled from its new contents on demand).
        lastFault[vcpu.id] = nil  // progress: the write is done
        vcpu.emulateTrappedWrite(frame: hostFrame)
        tableWritten(gfn)
        return (\.pageTableWrites, .resume)
    }

    /// Writes a guest page-table entry (accessed/dirty bits) through the second level;
    /// returns the violation when the second level forbids the write.
    private func setGuestEntry(_ gpa: UInt64, _ value: UInt64) -> Outcome? {
        switch vm.lookUpSecondLevel(gpa, access: .write, userAddress: false) {
        case let .host(offset, _, _):
            try? memory.store(value, at: offset | (gpa & 0xFFF))
            return nil
        case let .violation(g, a):
            stats.secondLevelViolations += 1
            return .secondLevelViolation(gpa: g, access: a)
        case .notRAM:
            return nil
        }
    }

    /// Builds the shadow path for `linear` from the current root; returns the leaf slot,
    /// or nil when the pool ran out.
    private func install(_ linear: UInt64, root: Int, levels: [GuestLevel], leafLevel: Int, leaf: UInt64, nxe: Bool) -> Int? {
        guard root != 0, info[root] != nil else { return nil }
        var page = root
        for level in stride(from: 3, to: 0, by: -1) {
            info[page]!.writesSinceUse = 0
            let index = Int((linear >> UInt64(12 + 9 * level)) & 0x1FF)
            let slot = page * 512 + index
            let existing = pool.entries[slot]
            let child: Int
            if level > leafLevel {
                // Mirrors a guest table.
                let guestEntry = levels[3 - level].entry
                let gfn = guestEntry & Self.physicalMask
                guard let c = shadowPage(gfn: gfn, level: level - 1) else { return nil }
                child = c
                var e = UInt64(c) << 12 | P.present | (guestEntry & (P.writable | P.user))
                if nxe && guestEntry >> 63 != 0 { e |= P.noExecute }
                if existing != e { replace(slot, with: e) }
            } else {
                // Inside a guest large page: a direct page owned by this entry.
                let guestEntry = levels[3 - leafLevel].entry
                var e = P.present | P.writable | P.user
                if level == leafLevel {
                    e = P.present | (guestEntry & (P.writable | P.user))
                    if nxe && guestEntry >> 63 != 0 { e |= P.noExecute }
                }
                let existingChild = Int((existing & P.frameMask) >> 12)
                if existing & P.present != 0 && existingChild < pool.pageCount, let i = info[existingChild], i.direct,
                   existing & ~P.frameMask == e {
                    child = existingChild
                } else {
                    guard let c = allocate(PageInfo(gfn: 0, level: level - 1, direct: true)) else { return nil }
                    child = c
                    replace(slot, with: UInt64(c) << 12 | e)
                }
            }
            if !(info[child]!.parents.contains(slot)) { info[child]!.parents.append(slot) }
            page = child
        }
        info[page]!.writesSinceUse = 0
        let slot = page * 512 + Int((linear >> 12) & 0x1FF)
        pool.entries[slot] = leaf
        return slot
    }

    /// Overwrites a non-leaf shadow entry, freeing the direct page it pointed at.
    private func replace(_ slot: Int, with value: UInt64) {
        let old = pool.entries[slot]
        pool.entries[slot] = value
        if old & P.present != 0 { releaseIfDirect(Int((old & P.frameMask) >> 12)) }
    }

    private func releaseIfDirect(_ page: Int) {
        guard page > 0 && page < pool.pageCount, let i = info[page], i.direct else { return }
        if i.level > 0 {
            for k in 0..<512 {
                let e = pool.entry(page: page, index: k)
                if e & P.present != 0 { releaseIfDirect(Int((e & P.frameMask) >> 12)) }
            }
        }
        pool.clear(page: page)
        info[page] = nil
        retired.append(page)
    }

    /// Empties every shadow page of `gfn` after the guest wrote that table; a table written
    /// again and again without being walked loses its shadow.
    private func tableWritten(_ gfn: UInt64) {
        guard let pages = shadowsOf[gfn] else { return }
        var flooded = false
        for p in pages {
            empty(p)
            stats.shadowPagesZapped += 1
            info[p]!.writesSinceUse += 1
            if info[p]!.writesSinceUse >= Self.floodThreshold && !roots.contains(p) { flooded = true }
        }
        if flooded { unshadow(gfn) }
        shootdown()
    }

    private func empty(_ page: Int) {
        for k in 0..<512 {
            let e = pool.entry(page: page, index: k)
            if e & P.present != 0 && info[page]!.level > 0 { releaseIfDirect(Int((e & P.frameMask) >> 12)) }
        }
        pool.clear(page: page)
    }

    /// Drops the shadows of `gfn` (those no vCPU uses as its root) and their parents'
    /// pointers to them; the gfn is no longer write-protected once none is left.
    private func unshadow(_ gfn: UInt64) {
        guard let pages = shadowsOf[gfn] else { return }
        var kept: [Int] = []
        for p in pages {
            if roots.contains(p) { kept.append(p); continue }
            for slot in info[p]!.parents where Int((pool.entries[slot] & P.frameMask) >> 12) == p {
                pool.entries[slot] = 0
            }
            byKey[Self.key(gfn, level: info[p]!.level)] = nil
            empty(p)
            info[p] = nil
            retired.append(p)
            stats.shadowPagesUnshadowed += 1
        }
        shadowsOf[gfn] = kept.isEmpty ? nil : kept
    }

    /// INVLPG: drops the shadow leaf of `linear` under the vCPU's root.
    private func invalidate(_ linear: UInt64, vcpu: any ShadowPagingVCPU) {
        var page = roots[vcpu.id]
        guard page != 0 else { return }
        for level in stride(from: 3, through: 0, by: -1) {
            let slot = page * 512 + Int((linear >> UInt64(12 + 9 * level)) & 0x1FF)
            let e = pool.entries[slot]
            guard e & P.present != 0 else { return }
            if level == 0 { pool.entries[slot] = 0; return }
            page = Int((e & P.frameMask) >> 12)
        }
    }
}

extension ShadowPager {
    /// A pager for `vm` with every vCPU switched to shadow mode over its pool.
    static func attach(to vm: any VM, vcpus: [any VCPU]) throws -> ShadowPager {
        let shadowVM = try vm.require((any ShadowPagingVM).self, .shadowPaging, neededBy: "--paging shadow")
        let pager = ShadowPager(vm: shadowVM, vcpuCount: vcpus.count)
        for v in vcpus {
            try v.require((any ShadowPagingVCPU).self, .shadowPaging, engine: vm.engineName, neededBy: "--paging shadow")
                .enableShadowPaging(pager.pool)
        }
        return pager
    }
}
