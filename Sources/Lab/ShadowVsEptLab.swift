import Devices
import Dispatch
import FoundationEssentials
#if canImport(Glibc)
import Glibc
#endif
import VirtCore
import VMM

/// Scenario S5: shadow paging against nested paging (EPT) on the software engine, which
/// models both. Two workloads — page-table churn (`pt-churn`: address spaces made, switched
/// between, unmapped and torn down) and a large stable working set (`working-set`: few
/// table changes, a TLB miss on nearly every access) — each in shadow mode and in nested
/// mode with 4 KiB, 2 MiB and 1 GiB second-level pages.
///
/// The trade the text describes: shadow mode pays a VMM exit for every guest table change,
/// CR3 load, INVLPG and shadow miss, but its walks read only the 4-level shadow table;
/// nested mode takes no exits, but a walk reads the second level for every guest level
/// (up to 24 references), fewer with large second-level pages.
package struct ShadowVsEptLab: Sendable {
    package struct Workload: Sendable, Codable {
        package var guest: String
        package var commandLine: String
        package var what: String
        /// The guest's marker values (port 0x81) around the measured phase.
        package var phaseStart: UInt32
        package var phaseEnd: UInt32
        package var phase: String
        package init(guest: String, commandLine: String, what: String, phaseStart: UInt32 = 1, phaseEnd: UInt32 = 2, phase: String = "all") {
            self.guest = guest; self.commandLine = commandLine; self.what = what
            self.phaseStart = phaseStart; self.phaseEnd = phaseEnd; self.phase = phase
        }
    }

    /// A paging configuration the lab measures.
    package struct Configuration: Sendable, Codable, Equatable {
        package var mode: PagingMode
        /// Nested mode: the second level's largest page.
        package var secondLevelPage: SecondLevelPageSize?
        package var name: String { mode == .shadow ? "shadow" : "nested, \(secondLevelPage?.rawValue ?? "4K") EPT pages" }
    }

    package var workloads: [Workload]
    package var configurations: [Configuration] = [
        Configuration(mode: .shadow),
        Configuration(mode: .nested, secondLevelPage: .size4K),
        Configuration(mode: .nested, secondLevelPage: .size2M),
        Configuration(mode: .nested, secondLevelPage: .size1G),
    ]
    package var memory: UInt64 = 128 << 20

    package init(scale: Int = 1) {
        workloads = [
            Workload(guest: "pt-churn", commandLine: "rounds=\(20 * scale) procs=4 pages=64 switches=4",
                     what: "page-table churn", phase: "all rounds"),
            Workload(guest: "working-set", commandLine: "pages=16384 passes=\(4 * scale)",
                     what: "large stable working set (64 MiB)", phaseStart: 3, phase: "after the first pass"),
        ]
    }

    package struct Row: Codable, Sendable {
        package var workload: String
        /// What the counters cover (the guest marks it).
        package var phase: String
        package var configuration: String
        package var mode: PagingMode
        package var secondLevelPage: SecondLevelPageSize?
        /// The whole run, and the measured phase.
        package var wallMilliseconds: Double
        package var phaseMilliseconds: Double
        package var instructions: UInt64
        /// Shadow-paging exits by reason (zero in nested mode), and the VMM's time on them.
        package var pageTableWriteExits: UInt64
        package var cr3LoadExits: UInt64
        package var invlpgExits: UInt64
        package var shadowFillExits: UInt64
        package var guestPageFaults: UInt64
        package var pagingExits: UInt64
        package var vmmMilliseconds: Double
        package var pageWalks: UInt64
        package var referencesPerWalk: Double
        package var walkReferences: UInt64
        package var tlbHitRate: Double?
        package var guestOutput: String
    }

    package struct Result: Codable, Sendable {
        package var engine: String
        package var rows: [Row]
    }

    /// One step per workload and configuration reported to `progress`.
    package func run(progress: LabProgress = .silent) throws -> Result {
        var rows: [Row] = []
        progress.begin(steps: workloads.count * configurations.count)
        for w in workloads {
            var reference: String?
            for c in configurations {
                progress.step("\(w.guest) (\(w.what)), \(c.name)")
                let row = try measure(w, c)
                // Every configuration must compute the same thing.
                if let r = reference, r != row.guestOutput {
                    throw LabError.guestFailed(what: "\(w.guest) in \(c.name)", reason: "output differs from \(configurations[0].name)", output: row.guestOutput)
                }
                reference = row.guestOutput
                rows.append(row)
            }
        }
        progress.finish()
        return Result(engine: "software", rows: rows)
    }

    func measure(_ w: Workload, _ c: Configuration) throws -> Row {
        let out = GuestOutput()
        var config = MachineConfiguration(memorySize: memory, commandLine: w.commandLine, timeoutSeconds: 600)
        config.paging = c.mode
        let m = try Machine(image: try GuestProgram.load(w.guest), configuration: config,
                            engine: try EngineSelection.make(.software), serialOutput: out.append)
        let phases = PagingPhasePort { [weak m] in m?.pagingReport }
        try m.attach(phases, firstPort: PagingPhasePort.port, count: 1)
        if let size = c.secondLevelPage {
            var sizing = try m.vm.require((any SecondLevelPageSizing).self, .secondLevelTranslation, neededBy: "lab shadow-vs-ept")
            sizing.secondLevelLargestPage = size
        }
        let r = try m.run()
        guard r.stopReason == .exitPort(status: 0) else {
            throw LabError.guestFailed(what: "\(w.guest) in \(c.name)", reason: r.stopReason.summary, output: out.text)
        }
        guard let (ns, before, after) = phases.phase(from: w.phaseStart, to: w.phaseEnd) else { throw LabError.noMarkers(w.guest) }
        let s = Self.difference(after.shadow ?? ShadowPagingStatistics(), before.shadow ?? ShadowPagingStatistics())
        let counts = PageWalkCounts(tlbLookups: after.counts.tlbLookups - before.counts.tlbLookups, walks: after.counts.walks - before.counts.walks,
                                    references: after.counts.references - before.counts.references)
        let report = PagingReport(mode: after.mode, secondLevelPage: after.secondLevelPage, counts: counts, shadow: s)
        return Row(workload: w.what, phase: w.phase, configuration: c.name, mode: c.mode, secondLevelPage: c.secondLevelPage,
                   wallMilliseconds: Double(r.wallNanoseconds) / 1e6, phaseMilliseconds: Double(ns) / 1e6,
                   instructions: m.executionCounts?.instructions ?? 0,
                   pageTableWriteExits: s.pageTableWrites.count, cr3LoadExits: s.contextSwitches.count,
                   invlpgExits: s.invalidations.count, shadowFillExits: s.fills.count, guestPageFaults: s.guestPageFaults.count,
                   pagingExits: s.exits, vmmMilliseconds: Double(s.nanoseconds) / 1e6,
                   pageWalks: report.counts.walks, referencesPerWalk: report.counts.referencesPerWalk,
                   walkReferences: report.counts.references, tlbHitRate: report.counts.tlbHitRate, guestOutput: out.text)
    }

    static func difference(_ a: ShadowPagingStatistics, _ b: ShadowPagingStatistics) -> ShadowPagingStatistics {
        func d(_ x: ExitCounter, _ y: ExitCounter) -> ExitCounter { ExitCounter(count: x.count - y.count, nanoseconds: x.nanoseconds - y.nanoseconds) }
        var s = ShadowPagingStatistics()
        s.pageTableWrites = d(a.pageTableWrites, b.pageTableWrites)
        s.contextSwitches = d(a.contextSwitches, b.contextSwitches)
        s.invalidations = d(a.invalidations, b.invalidations)
        s.fills = d(a.fills, b.fills)
        s.guestPageFaults = d(a.guestPageFaults, b.guestPageFaults)
        s.secondLevelViolations = a.secondLevelViolations - b.secondLevelViolations
        s.shadowPagesCreated = a.shadowPagesCreated - b.shadowPagesCreated
        s.shadowPagesZapped = a.shadowPagesZapped - b.shadowPagesZapped
        s.shadowPagesUnshadowed = a.shadowPagesUnshadowed - b.shadowPagesUnshadowed
        s.fullResets = a.fullResets - b.fullResets
        s.guestTableReads = a.guestTableReads - b.guestTableReads
        return s
    }

    package static func table(_ r: Result) -> LabTable {
        let rows = r.rows.map { x in
            [x.workload + " (" + x.phase + ")", x.configuration, String(x.pageTableWriteExits), String(x.cr3LoadExits), String(x.invlpgExits),
             String(x.shadowFillExits), x.vmmMilliseconds.fixed(1), String(x.pageWalks),
             x.referencesPerWalk.fixed(1), String(x.walkReferences),
             x.tlbHitRate.map { "\(($0 * 100).fixed(1)) %" } ?? "-", x.phaseMilliseconds.fixed(1)]
        }
        return LabTable(
            title: "S5 shadow paging vs nested paging (\(r.engine) engine; guest tables built at CPL0, pages touched at CPL3)",
            columns: ["workload", "paging", "PTE-write exits", "CR3 exits", "INVLPG exits", "fill exits", "VMM ms",
                      "walks", "refs/walk", "walk refs", "TLB hits", "phase ms"],
            rows: rows,
            notes: ["shadow: every guest page-table write (to a table that has a shadow), CR3 load, INVLPG and shadow miss exits to the VMM, which emulates the write or walks the guest tables and fills the shadow; the CPU's walk then reads only the 4-level shadow table (4 references).",
                    "nested: no exits; a TLB miss walks the guest tables and, for every guest entry and for the data, the second-level table: (g+1)(s+1)−1 references for g guest and s second-level levels — 24 for 4 × 4, 19 with 2 MiB and 14 with 1 GiB second-level pages (the boot identity map's 2 MiB guest pages make g = 3 for kernel accesses).",
                    "page-table churn makes shadow mode pay exits; the large working set, once warm, makes every TLB miss a long nested walk and costs shadow mode nothing but its short walks (its first pass, not shown, pays one or two fills per page). Counters cover the phase the guest marks; walks are those that completed (a faulting shadow walk is the VMM's fill). TLB hits: lookups reaching the CPU's TLB (interpreted accesses and the translator's misses) that did not walk.",
                    "wall time is this software model's, in which a walk costs little next to a VMM exit; on hardware the exit costs ~1 µs and each walk reference a cache or memory access."])
    }

    package static func chart(_ r: Result) -> BarChart {
        BarChart(title: "S5: exits vs walk references", categories: r.rows.map { "\($0.workload.split(separator: " ").prefix(2).joined(separator: " ")) / \($0.configuration.split(separator: ",").first ?? "")\($0.secondLevelPage.map { " " + $0.rawValue } ?? "")" },
                 series: [("paging exits", r.rows.map { Double($0.pagingExits) }),
                          ("walk references", r.rows.map { Double($0.walkReferences) }),
                          ("refs per walk", r.rows.map(\.referencesPerWalk))],
                 yLabel: "count", logarithmic: true)
    }
}

/// Port 0x81 for the paging lab: at each marker the guest writes, the machine's paging
/// counters as they stand (taken on the vCPU thread, at the exit).
final class PagingPhasePort: PortIODevice, @unchecked Sendable {
    // SAFETY: `marks` is touched only under `lock`.
    static let port: UInt16 = 0x81
    var name: String { "paging-phase-port" }
    private let lock = HostLock()
    private var marks: [UInt32: (nanoseconds: UInt64, report: PagingReport)] = [:]
    private let snapshot: @Sendable () -> PagingReport?

    init(snapshot: @escaping @Sendable () -> PagingReport?) { self.snapshot = snapshot }

    func portRead(offset: UInt16, size: UInt8) -> UInt32 { 0 }
    func portWrite(offset: UInt16, size: UInt8, value: UInt32) {
        let now = monotonicNanoseconds()
        guard let report = snapshot() else { return }
        lock.withLock { if marks[value] == nil { marks[value] = (now, report) } }
    }

    /// Nanoseconds from marker `from` to marker `to`, and the counters at each.
    func phase(from: UInt32, to: UInt32) -> (UInt64, PagingReport, PagingReport)? {
        lock.withLock {
            guard let a = marks[from], let b = marks[to], b.nanoseconds >= a.nanoseconds else { return nil }
            return (b.nanoseconds - a.nanoseconds, a.report, b.report)
        }
    }
}
