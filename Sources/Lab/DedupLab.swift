import Devices
import Dispatch
import FoundationEssentials
#if canImport(Glibc)
import Glibc
#endif
import GuestImages
import Synchronization
import VirtCore
import VMM

/// Scenario S8: page deduplication against the cost of breaking sharing. The
/// `dedup-workload` guest keeps N identical pages and writes each with probability p per
/// round (same value, so contents stay identical but sharing breaks). After `warm` rounds
/// the VMM estimates each page's write probability from the dirty log, merges, and counts
/// copy-on-write breaks round by round — once merging everything, once with the policy
/// that merges only pages whose predicted benefit is positive.
package struct DedupLab: Sendable {
    package var engine: EngineChoice
    package var pages: UInt64 = 1024
    package var warmRounds = 8
    package var policy = DeduplicationPolicy()
    package var writeProbabilities: [Double] = [0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5]

    package init(engine: EngineChoice) { self.engine = engine }

    package struct Row: Codable, Sendable {
        package var writeProbability: Double
        package var strategy: String
        package var pagesMerged: Int
        package var breaks: UInt64
        /// Page-rounds of memory saved over the horizon (merged pages not yet broken, per round).
        package var savedPageRounds: Double
        package var netBenefitPerPage: Double?
        package var predictedNetBenefitPerPage: Double
        package var hostPagesSavedAtEnd: Int
    }

    package struct Result: Codable, Sendable {
        package var engine: String
        package var pages: UInt64
        package var policy: DeduplicationPolicy
        package var predictedBreakEven: Double
        package var measuredBreakEven: Double?
        package var mechanism: String
        package var rows: [Row]
    }

    /// One step per run (write probability × strategy) reported to `progress`.
    package func run(progress: LabProgress = .silent) throws -> Result {
        var rows: [Row] = []
        progress.begin(steps: writeProbabilities.count * 2)
        for p in writeProbabilities {
            for usePolicy in [false, true] {
                progress.step("p=\(p), \(usePolicy ? "policy" : "merge all")")
                rows.append(try runOnce(p: p, usePolicy: usePolicy))
            }
        }
        progress.finish()
        // Where the measured benefit of merging everything crosses zero.
        let all = rows.filter { $0.strategy == "merge all" }
        var measured: Double?
        for (a, b) in zip(all, all.dropFirst()) {
            guard let x = a.netBenefitPerPage, let y = b.netBenefitPerPage, x > 0, y <= 0 else { continue }
            measured = a.writeProbability + (b.writeProbability - a.writeProbability) * x / (x - y)
            break
        }
        return Result(engine: engine.rawValue, pages: pages, policy: policy, predictedBreakEven: policy.breakEvenWriteProbability,
                      measuredBreakEven: measured,
                      mechanism: engine == .kvm ? "private mappings of a shared store page (the host kernel copies on write)"
                                                : "second-level page table: pages share one host frame, read-only (EPT violation breaks sharing)",
                      rows: rows)
    }

    /// Drives the experiment from the guest's round markers (port 0x81), on the vCPU thread.
    // SAFETY: driven only by the guest's port writes from its single vCPU thread; the lab reads the results after run() returned.
    final class Controller: PortIODevice, @unchecked Sendable {
        var name: String { "dedup-controller" }
        let machine: Machine
        let dedup: PageDeduplicator
        let pages: Int, warm: Int, usePolicy: Bool, breakEven: Double
        var area = 0..<0
        var dirtyRounds: [Int] = []
        var merged = 0
        var savedPageRounds = 0.0
        var error: String?

        init(machine: Machine, dedup: PageDeduplicator, pages: Int, warm: Int, usePolicy: Bool, breakEven: Double) {
            self.machine = machine; self.dedup = dedup; self.pages = pages; self.warm = warm
            self.usePolicy = usePolicy; self.breakEven = breakEven
        }

        func portRead(offset: UInt16, size: UInt8) -> UInt32 { 0 }
        func portWrite(offset: UInt16, size: UInt8, value: UInt32) {
            do {
                if value >= 0x10_0000 {
                    let first = Int(value) / 4096
                    area = first..<(first + pages)
                    dirtyRounds = [Int](repeating: 0, count: pages)
                    try machine.vm.require(DirtyPageLogging.self, .dirtyLogging, neededBy: "the dedup policy").setDirtyLogging(true)
                    return
                }
                let round = Int(value)
                if round <= warm {
                    let log = try machine.vm.require(DirtyPageLogging.self, .dirtyLogging).fetchDirtyLog()
                    for (i, page) in area.enumerated() where log[page] { dirtyRounds[i] += 1 }
                    if round == warm {
                        let groups = dedup.findDuplicates(in: area)
                        let estimate = { (p: GuestPage) -> Double in Double(self.dirtyRounds[p.page - self.area.lowerBound]) / Double(self.warm) }
                        merged = try dedup.merge(groups, where: { !self.usePolicy || estimate($0) < self.breakEven })
                    }
                    return
                }
                let s = dedup.statistics
                savedPageRounds += Double(max(0, merged - Int(s.breaks)))
            } catch {
                self.error = "\(error)"
            }
        }
    }

    func runOnce(p: Double, usePolicy: Bool) throws -> Row {
        let out = GuestOutput()
        let permille = Int((p * 1000).rounded())
        let config = MachineConfiguration(memorySize: 64 << 20,
                                          commandLine: "pages=\(pages) warm=\(warmRounds) rounds=\(policy.rounds) p=\(permille)",
                                          timeoutSeconds: 600)
        let m = try Machine(image: try GuestProgram.load("dedup-workload"), configuration: config,
                            engine: try EngineSelection.make(engine), serialOutput: out.append)
        let dedup = try PageDeduplicator(machine: m)
        let controller = Controller(machine: m, dedup: dedup, pages: Int(pages), warm: warmRounds, usePolicy: usePolicy,
                                    breakEven: policy.breakEvenWriteProbability)
        try m.attach(controller, firstPort: 0x81, count: 1)
        let r = try m.run()
        guard r.stopReason == .exitPort(status: 0), controller.error == nil else {
            throw LabError.guestFailed(what: "dedup-workload at p=\(p)", reason: controller.error ?? r.stopReason.summary, output: out.text)
        }
        let s = dedup.statistics
        let merged = controller.merged
        return Row(writeProbability: p, strategy: usePolicy ? "policy" : "merge all", pagesMerged: merged, breaks: s.breaks,
                   savedPageRounds: controller.savedPageRounds,
                   netBenefitPerPage: merged > 0 ? (controller.savedPageRounds - policy.breakCostPageRounds * Double(s.breaks)) / Double(merged) : nil,
                   predictedNetBenefitPerPage: policy.expected(writeProbability: p).benefit,
                   hostPagesSavedAtEnd: s.pagesSavedNow)
    }

    package static func table(_ r: Result) -> LabTable {
        let rows = r.rows.map { x in
            [x.writeProbability.fixed(2), x.strategy, String(x.pagesMerged), String(x.breaks),
             x.savedPageRounds.fixed(0), x.netBenefitPerPage.map { $0.fixed(2, sign: true) } ?? "-",
             x.predictedNetBenefitPerPage.fixed(2, sign: true),
             x.netBenefitPerPage.map { ($0 * Double(x.pagesMerged)).fixed(0, sign: true) } ?? "0", String(x.hostPagesSavedAtEnd)]
        }
        var notes = [
            "benefit per merged page = page-rounds saved − \(r.policy.breakCostPageRounds) × breaks, over \(r.policy.rounds) rounds; the model: Σ(1−p)^t − cost × (1 − (1−p)^R).",
            "predicted break-even write probability: \(r.predictedBreakEven.fixed(3))"
                + (r.measuredBreakEven.map { "; measured (merge all, interpolated): \($0.fixed(3))" } ?? "; measured: no crossing in the probabilities tried"),
            "the policy estimates each page's write probability from the warm-up rounds' dirty logs and merges only pages estimated below the break-even. Few rounds make a noisy estimate (a page written with p = 0.1 shows no write in 8 rounds 43 % of the time), so above the break-even it still merges some losers — but its net total stays far above merging everything, and near zero where merging loses.",
            "sharing: \(r.mechanism).",
        ]
        if r.engine == "kvm" { notes.append("breaks are counted from /proc/self/pagemap (a merged page that became anonymous was copied by the kernel).") }
        return LabTable(title: "S8 page deduplication: \(r.pages) identical pages (\(r.engine) engine, guest at CPL3)",
                        columns: ["p(write)", "strategy", "merged", "COW breaks", "page-rounds saved", "net/page", "model net/page", "net total", "pages saved at end"],
                        rows: rows, notes: notes)
    }

    /// Net benefit against write probability: the measured points of both strategies, the
    /// model's curve, negative values below the zero line, and the break-evens marked.
    package static func chart(_ r: Result) -> LineChart {
        func points(_ strategy: String) -> [(x: Double, y: Double)] {
            r.rows.filter { $0.strategy == strategy }.compactMap { row in row.netBenefitPerPage.map { (x: row.writeProbability, y: $0) } }
        }
        let highest = r.rows.map(\.writeProbability).max() ?? 0.5
        let model = (0...100).map { i -> (x: Double, y: Double) in
            let p = highest * Double(i) / 100
            return (x: p, y: r.policy.expected(writeProbability: p).benefit)
        }
        var markers = [LineChart.Marker(x: r.predictedBreakEven, label: "break-even, model: p = \(r.predictedBreakEven.fixed(3))")]
        if let measured = r.measuredBreakEven {
            markers.append(LineChart.Marker(x: measured, label: "break-even, measured: p = \(measured.fixed(3))"))
        }
        return LineChart(title: "S8 on the \(r.engine) engine: net benefit of merging a page vs its write probability",
                         xLabel: "write probability per round (p)", yLabel: "net benefit per merged page (page-rounds)",
                         series: [.init(name: "measured: merge all", points: points("merge all")),
                                  .init(name: "measured: merge by policy", points: points("policy")),
                                  .init(name: "model: Σ(1−p)^t − cost × (1 − (1−p)^R)", points: model, isModel: true)],
                         markers: markers)
    }
}
