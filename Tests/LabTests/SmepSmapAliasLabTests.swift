import Testing
import TestSupport
@testable import Lab
import VMM
import VirtCore

/// S10: every cell of the permission matrix behaves as the architecture says, on every
/// engine that runs it, and the MBEC cells reach the VMM with their qualification.
@Suite struct SmepSmapAliasLabTests {
    @Test func permissionMatrixHasNoUnexpectedCell() throws {
        var lab = SmepSmapAliasLab()
        lab.useKVM = kvmUsable
        let r = try lab.run()
        #expect(r.unexpectedCells == 0, "\(r.cells.filter { !$0.unexpected.isEmpty }.map { "\($0.probe) \($0.settings): \($0.observed)" })")
        #expect(r.engines.contains("software/nested") && r.engines.contains("software/shadow"))
        // Every probe was observed on the software engine in both modes (no cell silently skipped).
        let matrix = r.cells.filter { !$0.settings.contains("MBEC") }
        #expect(matrix.count == 12 * 8 + 1)
        for c in matrix {
            for e in ["software/nested", "software/shadow"] {
                if case .notRun = c.observed[e] { Issue.record("\(c.probe) \(c.settings) not run on \(e)") }
            }
        }
        // SMAP holds for implicit accesses even with AC set; STAC opens explicit ones.
        let implicitWithAC = try #require(matrix.first { $0.probe == "k-implicit-ldt-user" && $0.settings == "SMEP 0 SMAP 1 AC 1 WP 1" })
        #expect(implicitWithAC.observed["software/nested"] == .pageFault(errorCode: 1, cr2: 0x80_0000_7000))
        let explicitWithAC = try #require(matrix.first { $0.probe == "k-read-user" && $0.settings == "SMEP 0 SMAP 1 AC 1 WP 1" })
        #expect(explicitWithAC.observed["software/shadow"] == .completed)
        // MBEC: supervisor execution of the page denied directly, reported as a violation of a supervisor-mode address.
        let mbec = try #require(r.cells.first { $0.probe == "k-exec-kx-alias" && $0.settings.contains("MBEC on, EPT RW + user X") })
        #expect(mbec.observed["software/nested"] == .secondLevelViolation(access: "execute", allowed: "RWXu", userAddress: false))
        let userStillRuns = try #require(r.cells.first { $0.probe == "u-exec-user-alias" && $0.settings.contains("MBEC on, EPT RW + user X") })
        #expect(userStillRuns.observed["software/nested"] == .completed)
        for (engine, line) in r.aliasRewrite { #expect(line == "alias user-code before=0x11111111 after=0x22222222", "\(engine)") }
    }
}
