import Foundation
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
public struct ShadowVsEptLab: Sendable {
    public struct Workload: Sendable, Codable {
        public var guest: String
        public var commandLine: String
        public var what: String
        public init(guest: String, commandLine: String, what: String) {
            self.guest = guest; self.commandLine = commandLine; self.what = what
        }
    }

    /// A paging configuration the lab measures.
    public struct Configuration: Sendable, Codable, Equatable {
        public var mode: PagingMode
        /// Nested mode: the second level's largest page.
        public var secondLevelPage: SecondLevelPageSize?
        public var name: String { mode == .shadow ? "shadow" : "nested, \(secondLevelPage?.rawValue ?? "4K") EPT pages" }
    }

    public var workloads: [Workload]
    public var configurations: [Configuration] = [
        Configuration(mode: .shadow),
        Configuration(mode: .nested, secondLevelPage: .size4K),
        Configuration(mode: .nested, secondLevelPage: .size2M),
        Configuration(mode: .nested, secondLevelPage: .size1G),
    ]
    public var memory: UInt64 = 128 << 20

    public init(scale: Int = 1) {
        workloads = [
            Workload(guest: "pt-churn", commandLine: "rounds=\(20 * scale) procs=4 pages=64 switches=4",
                     what: "page-table churn"),
            Workload(guest: "working-set", commandLine: "pages=16384 passes=\(4 * scale)",
                     what: "large stable working set (64 MiB)"),
        ]
    }

    public struct Row: Codable, Sendable {
        public var workload: String
        public var configuration: String
        public var mode: PagingMode
        public var secondLevelPage: SecondLevelPageSize?
        public var wallMilliseconds: Double
        public var instructions: UInt64
        /// Shadow-paging exits by reason (zero in nested mode), and the VMM's time on them.
        public var pageTableWriteExits: UInt64
        public var cr3LoadExits: UInt64
        public var invlpgExits: UInt64
        public var shadowFillExits: UInt64
        public var guestPageFaults: UInt64
        public var pagingExits: UInt64
        public var vmmMilliseconds: Double
        public var pageWalks: UInt64
        public var referencesPerWalk: Double
        public var walkReferences: UInt64
        public var tlbHitRate: Double?
        public var guestOutput: String
    }

    public struct Result: Codable, Sendable {
        public var engine: String
        public var rows: [Row]
    }

    public func run(progress: (String) -> Void = { _ in }) throws -> Result {
        var rows: [Row] = []
        for w in workloads {
            var reference: String?
            for c in configurations {
                progress("\(w.guest) (\(w.what)), \(c.name)")
                let row = try measure(w, c)
                // Every configuration must compute the same thing.
                if let r = reference, r != row.guestOutput {
                    throw LabError.guestFailed(what: "\(w.guest) in \(c.name)", reason: "output differs from \(configurations[0].name)", output: row.guestOutput)
                }
                reference = row.guestOutput
                rows.append(row)
            }
        }
        return Result(engine: "software", rows: rows)
    }

    func measure(_ w: Workload, _ c: Configuration) throws -> Row {
        let out = GuestOutput()
        var config = MachineConfiguration(memorySize: memory, commandLine: w.commandLine, timeoutSeconds: 600)
        config.paging = c.mode
        let m = try Machine(image: try GuestProgram.load(w.guest), configuration: config,
                            engine: try EngineSelection.make(.software), serialOutput: out.append)
        if let size = c.secondLevelPage {
            var sizing = try m.vm.require((any SecondLevelPageSizing).self, .secondLevelTranslation, neededBy: "lab shadow-vs-ept")
            sizing.secondLevelLargestPage = size
        }
        let r = try m.run()
        guard r.stopReason == .exitPort(status: 0) else {
            throw LabError.guestFailed(what: "\(w.guest) in \(c.name)", reason: r.stopReason.summary, output: out.text)
        }
        guard let report = m.pagingReport else { throw LabError.badParameters("the engine keeps no page-walk counters") }
        let s = report.shadow ?? ShadowPagingStatistics()
        return Row(workload: w.what, configuration: c.name, mode: c.mode, secondLevelPage: c.secondLevelPage,
                   wallMilliseconds: Double(r.wallNanoseconds) / 1e6, instructions: m.executionCounts?.instructions ?? 0,
                   pageTableWriteExits: s.pageTableWrites.count, cr3LoadExits: s.contextSwitches.count,
                   invlpgExits: s.invalidations.count, shadowFillExits: s.fills.count, guestPageFaults: s.guestPageFaults.count,
                   pagingExits: s.exits, vmmMilliseconds: Double(s.nanoseconds) / 1e6,
                   pageWalks: report.counts.walks, referencesPerWalk: report.counts.referencesPerWalk,
                   walkReferences: report.counts.references, tlbHitRate: report.counts.tlbHitRate, guestOutput: out.text)
    }

    public static func table(_ r: Result) -> LabTable {
        let rows = r.rows.map { x in
            [x.workload, x.configuration, String(x.pageTableWriteExits), String(x.cr3LoadExits), String(x.invlpgExits),
             String(x.shadowFillExits), String(format: "%.1f", x.vmmMilliseconds), String(x.pageWalks),
             String(format: "%.1f", x.referencesPerWalk), String(x.walkReferences),
             x.tlbHitRate.map { String(format: "%.1f %%", $0 * 100) } ?? "-", String(format: "%.1f", x.wallMilliseconds)]
        }
        return LabTable(
            title: "S5 shadow paging vs nested paging (\(r.engine) engine; guest tables built at CPL0, pages touched at CPL3)",
            columns: ["workload", "paging", "PTE-write exits", "CR3 exits", "INVLPG exits", "fill exits", "VMM ms",
                      "walks", "refs/walk", "walk refs", "TLB hits", "wall ms"],
            rows: rows,
            notes: ["shadow: every guest page-table write (to a table that has a shadow), CR3 load, INVLPG and shadow miss exits to the VMM, which emulates the write or walks the guest tables and fills the shadow; the CPU's walk then reads only the 4-level shadow table (4 references).",
                    "nested: no exits; a TLB miss walks the guest tables and, for every guest entry and for the data, the second-level table: (g+1)(s+1)−1 references for g guest and s second-level levels — 24 for 4 × 4, 19 with 2 MiB and 14 with 1 GiB second-level pages (the boot identity map's 2 MiB guest pages make g = 3 for kernel accesses).",
                    "page-table churn makes shadow mode pay exits; the large working set makes every TLB miss a long nested walk. TLB hits: lookups reaching the CPU's TLB (interpreted accesses and the translator's misses) that did not walk.",
                    "wall time is this software model's, in which a walk costs little next to a VMM exit; on hardware the exit costs ~1 µs and each walk reference a cache or memory access."])
    }

    public static func chart(_ r: Result) -> BarChart {
        BarChart(title: "S5: exits vs walk references", categories: r.rows.map { "\($0.workload.split(separator: " ").prefix(2).joined(separator: " ")) / \($0.configuration.split(separator: ",").first ?? "")\($0.secondLevelPage.map { " " + $0.rawValue } ?? "")" },
                 series: [("paging exits", r.rows.map { Double($0.pagingExits) }),
                          ("walk references", r.rows.map { Double($0.walkReferences) }),
                          ("refs per walk", r.rows.map(\.referencesPerWalk))],
                 yLabel: "count", logarithmic: true)
    }
}
