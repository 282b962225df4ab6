import CHost
import Synchronization
import VirtCore
#if canImport(Glibc)
import Glibc
#endif

/// When merging a page pays: a merged page saves its 4 KiB for every round (scan interval)
/// until the guest writes it; the write costs a copy-on-write break. With write probability
/// `p` per round over a horizon of `rounds`, the expected saving is Σ_{t=1…R} (1−p)^t
/// page-rounds and the expected breaks 1 − (1−p)^R; merging pays when
/// saving − breakCost × breaks > 0.
public struct DeduplicationPolicy: Sendable, Codable {
    /// What one copy-on-write break costs, in page-rounds of saved memory.
    public var breakCostPageRounds: Double = 16
    /// The horizon the benefit is judged over, in rounds.
    public var rounds: Int = 32

    public init(breakCostPageRounds: Double = 16, rounds: Int = 32) {
        self.breakCostPageRounds = breakCostPageRounds
        self.rounds = rounds
    }

    /// Expected page-rounds saved, breaks, and net benefit of merging a page written with
    /// probability `p` per round.
    public func expected(writeProbability p: Double) -> (saved: Double, breaks: Double, benefit: Double) {
        let q = 1 - min(max(p, 0), 1)
        var saved = 0.0, survive = 1.0
        for _ in 0..<rounds { survive *= q; saved += survive }
        let breaks = 1 - survive
        return (saved, breaks, saved - breakCostPageRounds * breaks)
    }

    /// The write probability above which merging stops paying (bisection on `expected`).
    public var breakEvenWriteProbability: Double {
        guard expected(writeProbability: 1).benefit < 0 else { return 1 }
        guard expected(writeProbability: 0).benefit > 0 else { return 0 }
        var lo = 0.0, hi = 1.0
        for _ in 0..<60 {
            let mid = (lo + hi) / 2
            if expected(writeProbability: mid).benefit > 0 { lo = mid } else { hi = mid }
        }
        return (lo + hi) / 2
    }
}

public enum DeduplicationError: Error, CustomStringConvertible {
    case storeFailed(errno: Int32)
    case mapFailed(page: Int, errno: Int32)
    case devicesAttached

    public var description: String {
        switch self {
        case let .storeFailed(err): return "cannot create the deduplication store: \(String(cString: strerror(err)))"
        case let .mapFailed(page, err): return "cannot share guest page \(page): \(String(cString: strerror(err)))"
        case .devicesAttached: return "page sharing on the software engine needs a machine without DMA devices (virtio): their writes would bypass the second-level table"
        }
    }
}

/// A guest page of one of the deduplicator's machines.
public struct GuestPage: Hashable, Sendable, Comparable {
    public var machine: Int
    public var page: Int
    public init(machine: Int, page: Int) { self.machine = machine; self.page = page }
    public static func < (a: GuestPage, b: GuestPage) -> Bool { (a.machine, a.page) < (b.machine, b.page) }
}

/// Finds identical pages within and across VMs (hash, then compare) and merges them into
/// one read-only host page; the first write to a merged page breaks the sharing with a copy.
///
/// Across VMs, and on KVM: each merged page is remapped onto one page of a shared store
/// file with a private mapping, so the host kernel copies on write (the VM's own memfd page
/// is freed); breaks are read from /proc/self/pagemap. Within one software-engine VM: the
/// guest pages are pointed at one host frame in its second-level page table, read-only; a
/// write is an EPT violation whose handler copies and remaps. Merge while the vCPUs are
/// stopped (at an exit, or paused).
// SAFETY: merge state is in `lock`; the store fd and page count change only in merge(), called from one thread at a time while the guest is stopped or at its own exits.
public final class PageDeduplicator: @unchecked Sendable {
    public let machines: [Machine]
    public var machine: Machine { machines[0] }
    private let lock = Mutex(State())
    private var storeFD: Int32 = -1
    private var storePages = 0

    private struct State {
        /// Software engine: shared frame → the guest pages mapped to it.
        var groups: [Int: [Int]] = [:]
        /// Pages merged onto the store and not yet seen broken.
        var storeMerged: Set<GuestPage> = []
        var merged = 0
        var breaks: UInt64 = 0
    }

    public struct Statistics: Sendable, Codable {
        public var pagesMerged: Int
        /// Pages whose sharing a guest write broke.
        public var breaks: UInt64
        /// Host pages the merged pages occupy (one per distinct content).
        public var sharedHostPages: Int
        /// Host memory saved now: merged pages, minus broken ones, minus the shared copies.
        public var pagesSavedNow: Int
    }

    public convenience init(machine: Machine) throws { try self.init(machines: [machine]) }

    public init(machines: [Machine]) throws {
        precondition(!machines.isEmpty, "deduplicate at least one machine")
        self.machines = machines
        if machines.count == 1, let table = machines[0].vm as? any FrameRemapping {
            guard machines[0].bus.mmioDeviceNames.isEmpty else { throw DeduplicationError.devicesAttached }
            machines[0].memoryFaultHandler.set { [weak self] gpa, access in
                guard access.contains(.write), let self else { return false }
                return self.breakSharing(page: Int(gpa >> 12), table: table)
            }
        } else {
            let fd = host_memfd_create("swiftvisor-dedup-store")
            guard fd >= 0 else { throw DeduplicationError.storeFailed(errno: -fd) }
            storeFD = fd
        }
    }

    deinit {
        if storeFD < 0 { machine.memoryFaultHandler.set(nil) }
        if storeFD >= 0 { close(storeFD) }
    }

    func address(_ p: GuestPage) -> UnsafeMutableRawPointer { machines[p.machine].memory.base + p.page * 4096 }

    /// A 64-bit hash of a page (FNV-style mixing of 8-byte words).
    func hash(_ page: GuestPage) -> UInt64 {
        let p = address(page).assumingMemoryBound(to: UInt64.self)
        var h: UInt64 = 0xCBF2_9CE4_8422_2325
        for i in 0..<512 { h = (h ^ p[i]) &* 0x0000_0100_0000_01B3; h ^= h >> 29 }
        return h
    }

    /// Groups of identical pages among `pages` of every machine (hash, then byte
    /// comparison), each ≥ 2 pages.
    public func findDuplicates(in pages: Range<Int>) -> [[GuestPage]] {
        findDuplicates(among: machines.indices.flatMap { m in pages.map { GuestPage(machine: m, page: $0) } })
    }

    public func findDuplicates(among candidates: [GuestPage]) -> [[GuestPage]] {
        var byHash: [UInt64: [[GuestPage]]] = [:]
        for page in candidates {
            let h = hash(page)
            var buckets = byHash[h] ?? []
            if let i = buckets.firstIndex(where: { memcmp(address($0[0]), address(page), 4096) == 0 }) {
                buckets[i].append(page)
            } else {
                buckets.append([page])
            }
            byHash[h] = buckets
        }
        return byHash.values.flatMap { $0 }.filter { $0.count >= 2 }.sorted { $0[0] < $1[0] }
    }

    /// Merges each group into one read-only host page. `shouldMerge(page)` filters pages
    /// (the policy's verdict on that page); a group left with one page is skipped.
    /// Returns the pages merged.
    @discardableResult
    public func merge(_ groups: [[GuestPage]], where shouldMerge: (GuestPage) -> Bool = { _ in true }) throws -> Int {
        var total = 0
        for g in groups {
            let members = g.filter(shouldMerge)
            guard members.count >= 2 else { continue }
            if storeFD < 0, let table = machine.vm as? any FrameRemapping {
                mergeSecondLevel(members.map(\.page), table: table)
            } else {
                try mergeHostMapping(members)
            }
            total += members.count
        }
        lock.withLock { $0.merged += total }
        return total
    }

    private func mergeSecondLevel(_ members: [Int], table: any FrameRemapping) {
        let frame = members[0]
        for page in members { table.map(page: page, toFrame: frame, permissions: [.read, .execute]) }
        // The other members' own frames are unused now: give them back to the host.
        for page in members.dropFirst() { try? machine.memory.discard(gpa: UInt64(page) * 4096, length: 4096) }
        lock.withLock { $0.groups[frame] = members }
    }

    private func mergeHostMapping(_ members: [GuestPage]) throws {
        let offset = UInt64(storePages) * 4096
        guard ftruncate(storeFD, off_t(offset + 4096)) == 0 else { throw DeduplicationError.storeFailed(errno: errno) }
        guard pwrite(storeFD, address(members[0]), 4096, off_t(offset)) == 4096 else {
            throw DeduplicationError.storeFailed(errno: errno)
        }
        storePages += 1
        for p in members {
            let rc = host_map_private_page(address(p), storeFD, offset)
            guard rc == 0 else { throw DeduplicationError.mapFailed(page: p.page, errno: -rc) }
            _ = host_punch_hole(machines[p.machine].memory.fileDescriptor, UInt64(p.page) * 4096, 4096)
            machines[p.machine].vm.noteHostWrite(gpa: UInt64(p.page) * 4096, length: 4096)
        }
        lock.withLock { s in for p in members { s.storeMerged.insert(p) } }
    }

    /// Software engine: the EPT violation of a write to a shared page. Copies the shared
    /// frame into the page's own frame and maps it back, writable.
    private func breakSharing(page: Int, table: any FrameRemapping) -> Bool {
        let base = machine.memory.base
        return lock.withLock { s -> Bool in
            let frame = table.frame(of: page)
            guard var members = s.groups[frame], let index = members.firstIndex(of: page) else { return false }
            members.remove(at: index)
            s.breaks += 1
            if page != frame {
                memcpy(base + page * 4096, base + frame * 4096, 4096)
                table.map(page: page, toFrame: page, permissions: .all)
                table.noteHostWrite(gpa: UInt64(page) * 4096, length: 4096)
                s.groups[frame] = members.count >= 1 ? members : nil
                if members == [frame] { table.setPermissions(.all, pages: frame..<(frame + 1)); s.groups[frame] = nil }
            } else {
                // The frame's owner writes: the others move to a copy in one of their own frames.
                s.groups[frame] = nil
                if let newFrame = members.first {
                    memcpy(base + newFrame * 4096, base + frame * 4096, 4096)
                    table.noteHostWrite(gpa: UInt64(newFrame) * 4096, length: 4096)
                    for m in members { table.map(page: m, toFrame: newFrame, permissions: members.count >= 2 ? [.read, .execute] : .all) }
                    if members.count >= 2 { s.groups[newFrame] = members }
                }
                table.setPermissions(.all, pages: frame..<(frame + 1))
            }
            return true
        }
    }

    /// Store-merged pages the kernel has copied since the last look (present and no longer
    /// file-backed in /proc/self/pagemap) count as broken.
    public func refreshBreaks() {
        guard storeFD >= 0 else { return }
        lock.withLock { s in
            guard !s.storeMerged.isEmpty else { return }
            var broken: [GuestPage] = []
            for page in s.storeMerged {
                var entry: UInt64 = 0
                guard host_pagemap_entries(address(page), 1, &entry) == 0 else { continue }
                let present = entry >> 63 & 1 == 1, fileBacked = entry >> 61 & 1 == 1
                if present && !fileBacked { broken.append(page) }
            }
            for p in broken { s.storeMerged.remove(p) }
            s.breaks += UInt64(broken.count)
        }
    }

    public var statistics: Statistics {
        refreshBreaks()
        return lock.withLock { s in
            let shared = storeFD >= 0 ? storePages : s.groups.count
            return Statistics(pagesMerged: s.merged, breaks: s.breaks, sharedHostPages: shared,
                              pagesSavedNow: max(0, s.merged - Int(s.breaks) - shared))
        }
    }
}
