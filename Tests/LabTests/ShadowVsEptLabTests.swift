import Testing
@testable import Lab
import VMM
import VirtCore

/// S5 at a reduced size: the trade the lab exists to show must hold.
@Suite struct ShadowVsEptLabTests {
    @Test func shadowPaysExitsNestedPaysReferences() throws {
        var lab = ShadowVsEptLab()
        lab.memory = 48 << 20
        lab.workloads = [
            .init(guest: "pt-churn", commandLine: "rounds=3 procs=3 pages=32 switches=2", what: "churn"),
            .init(guest: "working-set", commandLine: "pages=4096 passes=3", what: "working set", phaseStart: 3),
        ]
        let r = try lab.run()
        #expect(r.rows.count == 8)
        func row(_ w: String, _ c: String) throws -> ShadowVsEptLab.Row {
            try #require(r.rows.first { $0.workload == w && $0.configuration == c })
        }
        let churnShadow = try row("churn", "shadow")
        #expect(churnShadow.pageTableWriteExits > 0 && churnShadow.cr3LoadExits > 0 && churnShadow.invlpgExits > 0)
        #expect(churnShadow.referencesPerWalk <= 4)
        for w in ["churn", "working set"] {
            let shadow = try row(w, "shadow")
            let n4 = try row(w, "nested, 4K EPT pages"), n2 = try row(w, "nested, 2M EPT pages"), n1 = try row(w, "nested, 1G EPT pages")
            // Churn exits all along; the warm working set walks its shadow without exits.
            if w == "churn" { #expect(shadow.pagingExits > 0) } else { #expect(shadow.pagingExits == 0) }
            #expect(shadow.referencesPerWalk == 4)
            for n in [n4, n2, n1] {
                #expect(n.pagingExits == 0)
                #expect(n.guestOutput == shadow.guestOutput)
                #expect(n.instructions == shadow.instructions)
                #expect(n.pageWalks == n4.pageWalks)  // the second level's page size changes walk length only
            }
            #expect(n4.referencesPerWalk > n2.referencesPerWalk && n2.referencesPerWalk > n1.referencesPerWalk)
            #expect(n1.referencesPerWalk > shadow.referencesPerWalk)
        }
        // The warm working set misses the TLB on nearly every access: nested walks read ~24 entries.
        #expect(try row("working set", "nested, 4K EPT pages").referencesPerWalk > 23)
        let t = ShadowVsEptLab.table(r).text
        #expect(t.contains("refs/walk") && t.contains("nested, 2M EPT pages"))
        #expect(ShadowVsEptLab.chart(r).svg.hasPrefix("<svg"))
    }
}
