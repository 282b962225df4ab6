import Foundation
import TestSupport
import Testing
@testable import Lab
import VMM
#if canImport(Glibc)
import Glibc
#endif

@Suite struct LabReportTests {
    @Test func tableAlignsColumnsAndKeepsNotes() {
        let t = LabTable(title: "T", columns: ["form", "exits"], rows: [["port", "1000000"], ["page", "12"]], notes: ["why"])
        let lines = t.text.split(separator: "\n").map(String.init)
        #expect(lines[0] == "T")
        #expect(lines[1] == "form    exits")
        #expect(lines[3] == "port  1000000")
        #expect(lines[4] == "page       12")
        #expect(lines[5] == "• why")
    }

    @Test func chartIsWellFormedSVGWithOneBarPerValue() {
        let c = BarChart(title: "a < b", categories: ["x", "y"], series: [("s1", [1, 1000]), ("s2", [10, 0])], yLabel: "n", logarithmic: true)
        let svg = c.svg
        #expect(svg.hasPrefix("<svg"))
        #expect(svg.hasSuffix("</svg>\n"))
        #expect(svg.contains("a &lt; b"))
        #expect(svg.components(separatedBy: "<rect x=").count - 1 == 4 + 2)  // 4 bars + 2 legend swatches
    }

    @Test func outputsAreWrittenNextToEachOther() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("lab-\(getpid())-\(UInt32.random(in: 0...UInt32.max))").path
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let files = try writeLabOutputs(name: "r", directory: dir, result: ["a": 1], chart: BarChart(title: "t", categories: ["a"], series: [("s", [1])], yLabel: "y"))
        #expect(try String(contentsOfFile: files.json, encoding: .utf8).contains("\"a\" : 1"))
        #expect(try String(contentsOfFile: files.svg, encoding: .utf8).hasPrefix("<svg"))
    }
}

/// S1 at a reduced size: the shapes the lab exists to show must hold on each engine.
@Suite struct PioVsMmioLabTests {
    @Test(arguments: TestEngines.available)
    func portFormExitsPerAccessAndPageFormDoesNot(engine: EngineChoice) throws {
        var lab = PioVsMmioLab(engine: engine)
        lab.reads = 20_000
        lab.writes = 200
        lab.tickInstructions = 20_000
        let r = try lab.run()
        let port = r.forms[0], page = r.forms[1]
        #expect(port.exits >= 20_200)  // every access, plus console and exit
        #expect(port.handledControlWrites == 200)
        #expect(page.handledControlWrites == 200)  // all handled, in batches
        #expect(page.exits < port.exits / 10)
        #expect(page.ticks > 0)
        #expect(page.dirtyScans > 0 && page.dirtyScans <= page.ticks)
        #expect(port.guestOutput.contains("port form, 20000 reads, 200 control writes"))
        #expect(page.guestOutput.contains("page form, 20000 reads, 200 control writes"))
    }
}

/// S2 at a reduced size: exits per packet follow the device protocols on each engine.
@Suite struct ParavirtVsEmulatedLabTests {
    @Test(arguments: TestEngines.available)
    func emulatedNICCostsFiveExitsPerPacketAndVirtioFarFewer(engine: EngineChoice) throws {
        var lab = ParavirtVsEmulatedLab(engine: engine)
        lab.packets = 640
        let r = try lab.run()
        let nic = r.forms[0], virtio = r.forms[1]
        #expect(nic.framesSeen == 640 && virtio.framesSeen == 640)
        #expect(nic.exitsPerPacket >= 5 && nic.exitsPerPacket < 5.1)  // plus a few probe reads
        #expect(virtio.exitsPerPacket < 0.2)  // a notify per 32 frames, plus setup
        #expect(r.exitNanoseconds > 0)
        #expect((nic.guestInstructionsPerPacket != nil) == (engine == .software))
        #expect(ParavirtVsEmulatedLab.table(r).rows.count == (engine == .kvm ? 3 : 2))
        if engine == .kvm {
            #expect(r.forms[2].exitsPerPacket < virtio.exitsPerPacket)  // ioeventfd: notifies stay in the kernel
            #expect(r.forms[2].framesSeen == 640)
        }
    }
}

/// S6 at a reduced size: the snapshot's accounting is consistent on each engine.
@Suite struct CowSnapshotLabTests {
    @Test(arguments: TestEngines.available)
    func copiesAreWholePagesAndClonesRestoreBothWays(engine: EngineChoice) throws {
        var lab = CowSnapshotLab(engine: engine)
        lab.memory = 32 << 20  // the guest's write area is 16 MiB
        let r = try lab.run()
        #expect(r.rows.count == 2)
        for row in r.rows {
            #expect(row.pauseMilliseconds <= row.totalMilliseconds)
            #expect(row.bytesCopied <= row.cowFaults * 4096)  // a fault copies at most one page
            #expect(row.fileBytes >= 32 << 20)
            #expect(row.lazyPagesFaultedIn > 0)
            if let a = row.writeAmplification { #expect(a == (row.workload.hasPrefix("small") ? 512 : 1)) }
        }
        #expect(CowSnapshotLab.table(r).rows.count == 2)
    }
}

/// S8 at a reduced size: with no writes everything stays merged; with many, sharing breaks
/// and the policy declines to merge.
@Suite struct DedupLabTests {
    @Test(arguments: TestEngines.available)
    func breaksFollowTheWriteProbabilityAndThePolicyAvoidsLosses(engine: EngineChoice) throws {
        var lab = DedupLab(engine: engine)
        lab.pages = 128
        lab.writeProbabilities = [0, 0.5]
        let r = try lab.run()
        let row = { (p: Double, s: String) in r.rows.first { $0.writeProbability == p && $0.strategy == s }! }
        #expect(row(0, "merge all").pagesMerged == 128)
        #expect(row(0, "merge all").breaks == 0)
        #expect(row(0, "merge all").hostPagesSavedAtEnd == 127)
        #expect(row(0.5, "merge all").breaks >= 120)
        #expect((row(0.5, "merge all").netBenefitPerPage ?? 0) < 0)
        #expect(row(0.5, "policy").pagesMerged < 16)
        #expect(r.predictedBreakEven > 0 && r.predictedBreakEven < 0.5)
    }
}

@Suite struct UniversalMachineLabTests {
    /// Every guest agrees with the interpreter on the translator (and KVM where usable), and
    /// the table reports the compute speed-up; the chart has one bar per guest and engine.
    @Test func sameResultsOnEveryEngine() throws {
        var lab = UniversalMachineLab(scale: 1)
        lab.workloads = lab.workloads.filter { $0.guest != "pio-loop" }
        let r = try lab.run()
        let translated = r.rows.contains { $0.engine == "software (translated)" }
        #expect(r.rows.count >= lab.workloads.count * (translated ? 2 : 1))
        for row in r.rows {
            #expect(row.sameOutput, "\(row.guest) on \(row.engine)")
            #expect(row.sameRegisters, "\(row.guest) on \(row.engine)")
            #expect(row.ramWordsDiffering == row.ramWordsDifferingOnlyInIOPL, "\(row.guest) on \(row.engine)")
            if row.engine.hasPrefix("software") { #expect(row.ramWordsDiffering == 0) }
        }
        if translated { #expect(try #require(r.translationSpeedup) > 1) }
        let table = UniversalMachineLab.table(r).text
        #expect(table.contains("compute scale=1"))
        #expect(UniversalMachineLab.chart(r).series.count == Set(r.rows.map(\.engine)).count)
    }
}
