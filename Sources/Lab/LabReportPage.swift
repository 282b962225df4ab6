import FoundationEssentials
import VirtCore
import VMM

/// One scenario as `lab report` shows it: what the source text claims, the model the lab
/// compares against, and how to turn the lab's JSON back into its table and chart.
package struct ReportedScenario: Sendable {
    /// "S8".
    package var id: String
    /// The lab's name: its subcommand and the prefix of its JSON files.
    package var lab: String
    package var title: String
    /// The claim of the source text, retold.
    package var claim: String
    package var model: String
    /// Quick settings that produce the JSON (written to lab-results/ by default).
    package var command: String
    package var render: @Sendable (Data) throws -> (table: LabTable, chart: any LabChart)
}

/// `swiftvisor lab report`: one static HTML page (inline SVG, no external assets) from the
/// labs' JSON results.
package enum LabReportPage {
    private static func decoding<R: Decodable>(_ type: R.Type, _ table: @escaping @Sendable (R) -> LabTable,
                                               _ chart: @escaping @Sendable (R) -> any LabChart) -> @Sendable (Data) throws -> (table: LabTable, chart: any LabChart) {
        { data in
            let result = try JSONDecoder().decode(R.self, from: data)
            return (table(result), chart(result))
        }
    }

    package static let scenarios: [ReportedScenario] = [
        ReportedScenario(
            id: "S1", lab: "pio-vs-mmio", title: "Trapped port I/O against a shared register page",
            claim: "A device polled about a million times, with some ten thousand control writes, costs more than a million exits when every register access traps; mapping the registers as ordinary memory and checking dirty bits on a periodic timer brings that down to about a thousand.",
            model: "Exits: one per access for port I/O; one per timer tick (plus console output) for the page. Wall time follows exits × exit cost.",
            command: "swiftvisor lab pio-vs-mmio --reads 100000 --writes 1000",
            render: decoding(PioVsMmioLab.Result.self, PioVsMmioLab.table, PioVsMmioLab.chart)),
        ReportedScenario(
            id: "S2", lab: "paravirt-vs-emulated", title: "Emulated NIC against virtio-net",
            claim: "An emulated NIC needs several register accesses, each an exit, per packet; a paravirtual driver batches packets and notifies once, so an instruction-cost model promises a several-fold throughput gain.",
            model: "packets/s = 1 / (exits per packet × measured cost of one exit).",
            command: "swiftvisor lab paravirt-vs-emulated --packets 2000",
            render: decoding(ParavirtVsEmulatedLab.Result.self, ParavirtVsEmulatedLab.table, ParavirtVsEmulatedLab.chart)),
        ReportedScenario(
            id: "S4", lab: "sriov-iommu", title: "SR-IOV virtual functions behind an IOMMU",
            claim: "Virtual functions handed to VMs do DMA that the IOMMU translates and checks; its translation rate limits throughput, larger IOMMU pages raise the limit, and DMA outside a VM's domain is blocked.",
            model: "Throughput bounded by translations per second ÷ translations per transfer (fewer with 2 MiB pages and a larger IOTLB).",
            command: "swiftvisor lab sriov-iommu",
            render: decoding(SriovIommuLab.Result.self, SriovIommuLab.table, SriovIommuLab.chart)),
        ReportedScenario(
            id: "S5", lab: "shadow-vs-ept", title: "Shadow page tables against nested paging",
            claim: "Shadow paging makes the hypervisor trap page-table writes, CR3 loads and INVLPG; nested paging (EPT) avoids those exits but walks two levels of tables in hardware on a TLB miss.",
            model: "Shadow: exits per page-table change; nested: up to 24 memory references per walk instead of 4.",
            command: "swiftvisor lab shadow-vs-ept",
            render: decoding(ShadowVsEptLab.Result.self, ShadowVsEptLab.table, ShadowVsEptLab.chart)),
        ReportedScenario(
            id: "S6", lab: "cow-snapshot", title: "Copy-on-write snapshots",
            claim: "Removing write permission in the second-level tables lets a snapshot be taken while the guest runs: the first write to each page exits and the host copies the page first, so a small write costs a whole page (write amplification).",
            model: "Bytes copied ≈ 4 KiB × pages first written during the snapshot; amplification = 4 KiB ÷ bytes the guest wrote there.",
            command: "swiftvisor lab cow-snapshot",
            render: decoding(CowSnapshotLab.Result.self, CowSnapshotLab.table, CowSnapshotLab.chart)),
        ReportedScenario(
            id: "S7", lab: "balloon", title: "Ballooning against a Zipf page cache",
            claim: "Inflating a balloon driver returns guest memory to the host, and the guest pays with more page faults; how many more follows from a Zipf model of its page accesses.",
            model: "Miss rate of a cache of C of W pages under Zipf(s): top-C 1 − H(C,s)/H(W,s), and Che's approximation for LRU.",
            command: "swiftvisor lab balloon --pages 512 --accesses 20000",
            render: decoding(BalloonLab.Result.self, BalloonLab.table, BalloonLab.chart)),
        ReportedScenario(
            id: "S8", lab: "dedup", title: "Page deduplication and its break-even",
            claim: "Merging identical pages (as KSM does) saves memory, but a write to a shared page costs a copy-on-write break; merging pays only for pages written rarely, so there is a write probability above which it loses.",
            model: "Per merged page over R rounds: saved Σ(1−p)^t page-rounds minus break cost × (1 − (1−p)^R) expected breaks; the break-even p is where that is zero.",
            command: "swiftvisor lab dedup --pages 256",
            render: decoding(DedupLab.Result.self, DedupLab.table, DedupLab.chart)),
        ReportedScenario(
            id: "S9", lab: "live-migration", title: "Pre-copy against post-copy live migration",
            claim: "Pre-copy sends memory while the guest runs and then the pages it dirtied, round after round, pausing only for the rest; post-copy moves the CPU state first and pulls pages on demand. Downtime depends on what is left to send while paused.",
            model: "Pre-copy converges while the dirty rate stays below the link's bandwidth; downtime ≈ remaining dirty bytes ÷ bandwidth.",
            command: "swiftvisor lab live-migration",
            render: decoding(LiveMigrationLab.Result.self, LiveMigrationLab.table, LiveMigrationLab.chart)),
        ReportedScenario(
            id: "S10", lab: "smep-smap-alias", title: "SMEP, SMAP and the user/kernel alias",
            claim: "SMEP and SMAP must hold inside guests; a page can be executable for the user yet writable and not executable for the kernel by aliasing two guest mappings while the second level allows everything; MBEC separates user and supervisor execute rights.",
            model: "Each forbidden access faults with the expected error code; each allowed one succeeds.",
            command: "swiftvisor lab smep-smap-alias",
            render: decoding(SmepSmapAliasLab.Result.self, SmepSmapAliasLab.table, SmepSmapAliasLab.chart)),
        ReportedScenario(
            id: "S12", lab: "mixed-criticality", title: "Mixed-criticality partitions",
            claim: "A partitioning hypervisor pins a critical VM's vCPUs to their own cores and protects a shared I/O queue with priority inheritance or a priority ceiling, so a best-effort VM cannot delay the critical task unboundedly.",
            model: "Worst-case latency bounded by the critical section length with PI/PCP; unbounded (priority inversion) without.",
            command: "swiftvisor lab mixed-criticality",
            render: decoding(MixedCriticalityLab.Result.self, MixedCriticalityLab.table, MixedCriticalityLab.chart)),
        ReportedScenario(
            id: "S13", lab: "universal-machine", title: "One guest, three machines",
            claim: "An emulator is a universal machine: it runs what the hardware runs, and hardware virtualization only makes it faster.",
            model: "Identical output, registers and memory on every engine; speed ratios between interpreter, translator and KVM.",
            command: "swiftvisor lab universal-machine",
            render: decoding(UniversalMachineLab.Result.self, UniversalMachineLab.table, UniversalMachineLab.chart)),
    ]

    /// `lab`'s result files in `directory`: `<lab>.json` or `<lab>-<engine>.json`, sorted.
    package static func resultFiles(for lab: String, in directory: String) -> [String] {
        let names = (try? FileManager.default.contentsOfDirectory(atPath: directory)) ?? []
        return names.filter { name in
            guard name.hasSuffix(".json") else { return false }
            let stem = String(name.dropLast(5))
            return stem == lab || EngineChoice.allCases.contains { stem == "\(lab)-\($0.rawValue)" }
        }.sorted().map { directory + "/" + $0 }
    }

    /// The page, and the scenarios that had no result file (their commands are on the page).
    package static func html(from directory: String) -> (html: String, missing: [ReportedScenario]) {
        var sections: [String] = []
        var missing: [ReportedScenario] = []
        for scenario in scenarios {
            let files = resultFiles(for: scenario.lab, in: directory)
            if files.isEmpty { missing.append(scenario) }
            sections.append(section(scenario, files: files))
        }
        let contents = scenarios.map { "<li><a href=\"#\(escape($0.id))\">\(escape($0.id)) \(escape($0.title))</a></li>" }.joined()
        let html = """
            <!DOCTYPE html>
            <html lang="en"><head><meta charset="utf-8"><title>Swiftvisor lab report</title>
            <style>
            body { font-family: sans-serif; max-width: 1500px; margin: 2em auto; padding: 0 1em; color: #222; }
            section { border-top: 1px solid #ccc; margin-top: 2em; }
            .claim { font-size: 1.05em; } .model { color: #444; }
            .pair { display: flex; flex-wrap: wrap; gap: 2em; align-items: flex-start; }
            table { border-collapse: collapse; font-size: 0.85em; } td, th { border: 1px solid #ccc; padding: 2px 6px; }
            td.num { text-align: right; font-variant-numeric: tabular-nums; } th { background: #f4f4f4; }
            .notes { font-size: 0.85em; max-width: 60em; } .missing { color: #a33; }
            </style></head><body>
            <h1>Swiftvisor lab report</h1>
            <p>Results read from <code>\(escape(directory))</code>. Each scenario: what the source text claims, the model the lab compares with, the measured table and its chart.</p>
            <ul>\(contents)</ul>
            \(sections.joined(separator: "\n"))
            </body></html>

            """
        return (html, missing)
    }

    static func section(_ s: ReportedScenario, files: [String]) -> String {
        var out = "<section id=\"\(escape(s.id))\"><h2>\(escape(s.id)) \(escape(s.lab)): \(escape(s.title))</h2>\n"
        out += "<p class=\"claim\"><b>The claim.</b> \(escape(s.claim))</p>\n"
        out += "<p class=\"model\"><b>The model.</b> \(escape(s.model))</p>\n"
        if files.isEmpty {
            out += "<p class=\"missing\">No result yet: run <code>\(escape(s.command))</code> (it writes the JSON into lab-results/), then make this report again.</p>\n"
        }
        for file in files {
            let name = String(file.split(separator: "/").last ?? "")
            do {
                let (table, chart) = try s.render(try Data(contentsOf: URL(fileURLWithPath: file)))
                out += "<h3>\(escape(table.title)) <small>(\(escape(name)))</small></h3>\n"
                out += "<div class=\"pair\"><div>\(htmlTable(table))</div><figure>\(chart.svg)</figure></div>\n"
            } catch {
                out += "<p class=\"missing\">\(escape(name)) could not be read (\(escape("\(error)"))); make it again with <code>\(escape(s.command))</code>.</p>\n"
            }
        }
        return out + "</section>"
    }

    static func htmlTable(_ t: LabTable) -> String {
        func isNumber(_ cell: String) -> Bool {
            let digits = cell.filter { $0.isNumber }
            return !digits.isEmpty && digits.count * 2 >= cell.count
        }
        var out = "<table><tr>" + t.columns.map { "<th>\(escape($0))</th>" }.joined() + "</tr>\n"
        for row in t.rows {
            out += "<tr>" + row.map { "<td\(isNumber($0) ? " class=\"num\"" : "")>\(escape($0))</td>" }.joined() + "</tr>\n"
        }
        out += "</table>\n"
        if !t.notes.isEmpty { out += "<ul class=\"notes\">" + t.notes.map { "<li>\(escape($0))</li>" }.joined() + "</ul>\n" }
        return out
    }

    static func escape(_ s: String) -> String {
        BarChart.escape(s).replacing("\"", with: "&quot;")
    }
}
