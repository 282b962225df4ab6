import GuestImages
import Testing
import TestSupport
import VMM
import VirtCore
import X86Emulator

/// Guests that change their own page tables (software engine only: they run at CPL0, which
/// this host's nested KVM emulates slowly).
let pagingCases: [GuestCase] = [
    GuestCase(guest: "pt-churn", commandLine: "rounds=6 procs=3 pages=40 switches=3", memory: 32 << 20),
    GuestCase(guest: "working-set", commandLine: "pages=2048 passes=2", memory: 32 << 20),
    GuestCase(guest: "smep-smap", memory: 32 << 20),
]

/// Scenario S5: every bundled guest gives the same results with shadow paging as with
/// nested paging on the software engine, translator on and off. Shadow paging's own exits
/// are the VMM's business and invisible to the guest, so they are left out of the comparison.
@Suite struct PagingModeDifferentialTests {
    static func guestVisible(_ exits: [VMExit]) -> [VMExit] {
        exits.filter { if case .shadowPaging = $0 { return false } else { return true } }
    }

    @Test(arguments: cases + pagingCases, [true, false])
    func shadowMatchesNested(_ c: GuestCase, translation: Bool) throws {
        let nested = try observe(c, on: SoftwareEngine(translation: translation), paging: .nested)
        let shadow = try observe(c, on: SoftwareEngine(translation: translation), paging: .shadow)
        #expect(shadow.output == nested.output)
        #expect(shadow.stop == nested.stop)
        #expect(firstDifference(Self.guestVisible(shadow.exits[0]), Self.guestVisible(nested.exits[0])) == nil)
        #expect(shadow.rip == nested.rip)
        #expect(shadow.registers == nested.registers)
        if c.vcpus == 1 {
            let diffs = differingWords(nested.ram, shadow.ram)
            #expect(diffs.isEmpty, "RAM differs at \(diffs.prefix(8).map { "0x" + String($0.0, radix: 16) })")
        }
    }

    /// The page-table guests really exercise the pager: CR3 loads, INVLPG, trapped table
    /// writes and fills, and they print the same checksum in both modes.
    @Test func churnExitsEveryKind() throws {
        let guest = try #require(BundledGuests.named("pt-churn"))
        var config = MachineConfiguration(memorySize: 32 << 20, commandLine: "rounds=4 procs=3 pages=40 switches=2", timeoutSeconds: 120)
        config.paging = .shadow
        let out = SerialCapture()
        let m = try Machine(image: try ELFImage(bytes: guest.elf), configuration: config, engine: SoftwareEngine(), serialOutput: out.append)
        let r = try m.run()
        #expect(r.stopReason == .exitPort(status: 0), "\(out.text)")
        let report = try #require(m.pagingReport)
        let s = try #require(report.shadow)
        #expect(s.contextSwitches.count > 0 && s.invalidations.count > 0 && s.pageTableWrites.count > 0 && s.fills.count > 0)
        #expect(r.statistics[.shadowPaging].count == s.exits)
        // The shadow table is walked alone: four references, fewer for a walk that stops at a hole.
        #expect(report.counts.referencesPerWalk > 3.5 && report.counts.referencesPerWalk <= 4)
    }

    /// Nested walks read the second level for each guest level and for the data: a walk
    /// of g guest levels over an s-level second level reads (g+1)(s+1)-1 entries — 24 for
    /// 4 × 4 — and 2 MiB and 1 GiB second-level pages (s = 3, 2) shorten it. The guest's
    /// user pages are 4 KiB (g = 4), the boot identity map 2 MiB (g = 3).
    @Test(arguments: [(SecondLevelPageSize.size4K, 19.0...24.0), (.size2M, 15.0...19.0), (.size1G, 11.0...14.0)])
    func nestedWalkLength(_ size: SecondLevelPageSize, expected: ClosedRange<Double>) throws {
        let guest = try #require(BundledGuests.named("working-set"))
        let config = MachineConfiguration(memorySize: 32 << 20, commandLine: "pages=2048 passes=4", timeoutSeconds: 120)
        let m = try Machine(image: try ELFImage(bytes: guest.elf), configuration: config, engine: SoftwareEngine(), serialOutput: { _ in })
        let sizing = try #require(m.vm as? any SecondLevelPageSizing)
        sizing.secondLevelLargestPage = size
        #expect(try m.run().stopReason == .exitPort(status: 0))
        let counts = try #require(m.pagingReport).counts
        #expect(expected.contains(counts.referencesPerWalk), "\(counts.referencesPerWalk)")
        // Most walks are of the user pages, so the average sits near the 4-level figure.
        #expect(counts.referencesPerWalk > expected.upperBound - 2, "\(counts.referencesPerWalk)")
    }
}
