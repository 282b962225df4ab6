import Foundation
import Testing

/// The S4 and S12 labs as a new user runs them.
@Suite struct IsolationLabCLITests {
    /// A partitioned VM's disk works through the IOMMU: its DMA is translated, nothing faults.
    @Test func partitionedRunConfinesItsDisk() throws {
        let image = NSTemporaryDirectory() + "swiftvisor-partition-disk-\(getpid()).img"
        var bytes = [UInt8](repeating: 0, count: 16 * 512)
        bytes.replaceSubrange(0..<18, with: Array("partitioned image\n".utf8))
        try Data(bytes).write(to: URL(fileURLWithPath: image))
        defer { unlink(image) }
        // The first CPU this process may run on.
        let status = try String(contentsOfFile: "/proc/self/status", encoding: .utf8)
        let allowed = status.split(separator: "\n").first { $0.hasPrefix("Cpus_allowed_list:") } ?? ""
        let cpu = Int(allowed.dropFirst("Cpus_allowed_list:".count).drop { $0 == " " || $0 == "\t" }.prefix { $0.isNumber }) ?? 0
        let r = try swiftvisor(["run", "disk", "--disk", image, "--partition", "0:\(cpu)", "--engine", "software", "--stats"])
        #expect(r.status == 0, "\(r.stderr)")
        #expect(r.stdout.contains("disk: sector 0: partitioned image"), "\(r.stdout)")
        let line = try #require(r.stderr.split(separator: "\n").first { $0.hasPrefix("IOMMU (partitions' devices): ") }, "\(r.stderr)")
        #expect(line.hasSuffix(" translations, 0 faults") && !line.contains(": 0 translations"), "\(line)")
    }

    @Test func sriovIommuPrintsItsTableAndJSON() throws {
        let dir = NSTemporaryDirectory() + "swiftvisor-sriov-\(getpid())"
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let table = try swiftvisor(["lab", "sriov-iommu", "--engine", "software", "--iotlb", "64", "--round-trips", "10", "--output", dir])
        #expect(table.status == 0, "\(table.stderr)")
        #expect(table.stdout.contains("S4 SR-IOV behind an IOMMU"))
        #expect(table.stdout.contains("rx: blocked"))
        let json = try swiftvisor(["lab", "sriov-iommu", "--engine", "software", "--iotlb", "64", "--round-trips", "0", "--json", "--output", dir])
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

/// `swiftvisor run --partition`: a partitioned VM runs; what the host refuses is one line.
@Suite struct PartitionCLITests {
    @Test func aPinnedVMRuns() throws {
        let r = try swiftvisor(["run", "hello", "--engine", "software", "--partition", "0:0"])
        #expect(r.status == 0, "\(r.stderr)")
        #expect(r.stdout.contains("Hello from Swiftvisor!"))
    }

    @Test func hostRefusalsAreOneClearLine() throws {
        let cpu = try swiftvisor(["run", "hello", "--engine", "software", "--partition", "0:4000"])
        #expect(cpu.status == 125)
        #expect(cpu.stderr.hasPrefix("swiftvisor: error: host CPU 4000 is not available to this process"))
        let prio = try swiftvisor(["run", "hello", "--engine", "software", "--partition", "0:0,fifo=500"])
        #expect(prio.status == 125 && prio.stderr.contains("SCHED_FIFO priority 500 is outside"))
        let vm = try swiftvisor(["run", "hello", "--partition", "2:0"])
        #expect(vm.status != 0 && vm.stderr.contains("there is no VM 2"))
    }

    /// As an unprivileged user SCHED_FIFO is refused up front (needs root and setpriv to test).
    @Test(.enabled(if: getuid() == 0 && FileManager.default.isExecutableFile(atPath: "/usr/bin/setpriv"), "needs root and setpriv"))
    func realtimeWithoutPermissionIsRefusedWithTheReason() throws {
        let r = try swiftvisor(["run", "hello", "--engine", "software", "--partition", "0:0,fifo=50"],
                               launcher: ["/usr/bin/setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all", "--bounding-set=-all"])
        #expect(r.status == 125)
        #expect(r.stderr.contains("SCHED_FIFO priority 50 refused") && r.stderr.contains("needs root or CAP_SYS_NICE"), "\(r.stderr)")
    }
}
