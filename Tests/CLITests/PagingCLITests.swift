import Foundation
import Testing
import TestSupport

/// Scenarios S5 and S10 as a new user meets them on the command line.
@Suite struct PagingCLITests {
    @Test func shadowPagingPrintsWhatNestedPrints() throws {
        let nested = try swiftvisor(["run", "compute", "--engine", "software", "--paging", "nested"])
        let shadow = try swiftvisor(["run", "compute", "--engine", "software", "--paging", "shadow", "--stats"])
        #expect(nested.status == 0 && shadow.status == 0)
        #expect(!nested.stdout.isEmpty && shadow.stdout == nested.stdout)
        #expect(shadow.stderr.contains("paging: shadow") && shadow.stderr.contains("shadow exits:"), "\(shadow.stderr)")
    }

    @Test func shadowPagingNeedsTheSoftwareEngine() throws {
        let r = try swiftvisor(["run", "hello", "--engine", "kvm", "--paging", "shadow"])
        #expect(r.status == 64)
        #expect(r.stderr.contains("--paging shadow needs --engine software"))
        let bad = try swiftvisor(["run", "hello", "--engine", "software", "--paging", "sideways"])
        #expect(bad.status == 64)
    }

    @Test func bothLabsPrintTheirTables() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("paging-labs-\(getpid())").path
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let s5 = try swiftvisor(["lab", "shadow-vs-ept", "--output", dir])
        #expect(s5.status == 0, "\(s5.stderr)")
        #expect(s5.stdout.contains("S5 shadow paging vs nested paging") && s5.stdout.contains("refs/walk"))
        let s10 = try swiftvisor(["lab", "smep-smap-alias", "--output", dir] + (kvmUsable ? [] : ["--no-kvm"]))
        #expect(s10.status == 0, "\(s10.stderr)")
        #expect(s10.stdout.contains("unexpected cells: 0"))
        #expect(FileManager.default.fileExists(atPath: dir + "/smep-smap-alias.json"))
        #expect(FileManager.default.fileExists(atPath: dir + "/shadow-vs-ept.svg"))
    }
}
