import Foundation
import Testing

/// The S4 and S12 labs as a new user runs them.
@Suite struct IsolationLabCLITests {
    @Test func sriovIommuPrintsItsTableAndJSON() throws {
        let dir = NSTemporaryDirectory() + "swiftvisor-sriov-\(getpid())"
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let table = try swiftvisor(["lab", "sriov-iommu", "--engine", "software", "--iotlb", "64", "--output", dir])
        #expect(table.status == 0, "\(table.stderr)")
        #expect(table.stdout.contains("S4 SR-IOV behind an IOMMU"))
        #expect(table.stdout.contains("rx: blocked"))
        let json = try swiftvisor(["lab", "sriov-iommu", "--engine", "software", "--iotlb", "64", "--json", "--output", dir])
        let obj = try #require(try JSONSerialization.jsonObject(with: Data(json.stdout.utf8)) as? [String: Any])
        let points = try #require(obj["throughput"] as? [[String: Any]])
        #expect(points.count == 2)  // 4K and 2M at one IOTLB size
        #expect(FileManager.default.fileExists(atPath: dir + "/sriov-iommu.svg"))
    }

    @Test func sriovIommuRejectsAnUnknownReplacement() throws {
        let r = try swiftvisor(["lab", "sriov-iommu", "--replacement", "mru"])
        #expect(r.status != 0)
        #expect(r.stderr.contains("lru, fifo or random"))
    }

    @Test func mixedCriticalityHelpAndItsLimits() throws {
        let help = try swiftvisor(["lab", "mixed-criticality", "--help"])
        #expect(help.status == 0 && help.stdout.contains("PTHREAD_PRIO_PROTECT"))
        let r = try swiftvisor(["lab", "mixed-criticality", "--burst-us", "6000", "--load-period-us", "5000"])
        #expect(r.status != 0 && r.stderr.contains("shorter than --load-period-us"))
    }
}
