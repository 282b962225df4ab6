import Foundation
import TestSupport
import Testing

/// `bench linux-boot` without the minutes a full measurement takes: its errors, a boot that
/// fails, and a boot killed at its deadline, each with the JSON it writes.
@Suite struct CLIBenchLinuxBootTests {
    static func readJSON(_ path: String) throws -> [String: Any] {
        try #require(try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: path))) as? [String: Any])
    }

    @Test func aMissingKernelIsOneClearLine() throws {
        let r = try swiftvisor(["bench", "linux-boot", "--runs", "1", "--kernel", "/nonexistent/vmlinuz", "--initrd", "/nonexistent/initrd"])
        #expect(r.status != 0)
        #expect(r.stderr.contains("--kernel /nonexistent/vmlinuz: no such file"), "\(r.stderr)")
        #expect(!r.stderr.contains("Fatal error"))
        #expect(r.stdout.isEmpty)
    }

    @Test func aBadEngineIsAUsageError() throws {
        let r = try swiftvisor(["bench", "linux-boot", "--engine", "bochs"])
        #expect(r.status == 64)
        #expect(r.stderr.contains("--engine must be software, qemu or both"))
    }

    /// A "kernel" the software engine refuses: the child exits at once, the boot is reported
    /// as failed with its last output, and the JSON says so (the schema, decoded back).
    @Test func aBootThatFailsIsReportedInTheTableAndJSON() throws {
        let dir = NSTemporaryDirectory() + "swiftvisor-linux-boot-\(getpid())"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let kernel = dir + "/not-a-kernel", initrd = dir + "/initrd", json = dir + "/out.json"
        try Data(repeating: 0x5A, count: 4096).write(to: URL(fileURLWithPath: kernel))
        try Data(repeating: 0, count: 512).write(to: URL(fileURLWithPath: initrd))
        let r = try swiftvisor(["bench", "linux-boot", "--runs", "1", "--engine", "software", "--kernel", kernel, "--initrd", initrd,
                                "--timeout", "60", "--json", json])
        #expect(r.status != 0)
        #expect(r.stderr.contains("software boot 1: exited"), "\(r.stderr)")
        #expect(r.stderr.contains("no boot reached the shell prompt"))
        #expect(r.stdout.contains("engine      median"))
        let obj = try Self.readJSON(json)
        #expect(obj["benchmark"] as? String == "linux-boot")
        #expect(obj["kernel"] as? String == kernel)
        #expect(obj["memory_mi_b"] as? Int == 256)
        let engine = try #require((obj["engines"] as? [[String: Any]])?.first)
        #expect(engine["engine"] as? String == "software")
        let boot = try #require((engine["boots"] as? [[String: Any]])?.first)
        #expect(boot["seconds"] == nil)
        #expect((boot["failure"] as? String)?.contains("before the shell prompt") == true)
    }

    /// Debian's kernel (Scripts/linux-guest.sh, the bench's default) cannot reach its prompt in
    /// 2 s: the child is killed at the deadline and the benchmark ends.
    @Test func aBootPastItsDeadlineIsKilled() throws {
        let dir = NSTemporaryDirectory() + "swiftvisor-linux-boot-deadline-\(getpid())"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let json = dir + "/out.json"
        // The scratch directory the Linux tests use, so the script's download is shared.
        let scratch = "LINUX_SCRATCH=" + NSTemporaryDirectory() + "swiftvisor-linux"
        let r = try swiftvisor(["bench", "linux-boot", "--runs", "1", "--engine", "software", "--timeout", "2", "--json", json],
                               launcher: ["/usr/bin/env", scratch])
        if r.stderr.contains("Scripts/linux-guest.sh failed") {
            print("skipped: apt-get could not fetch Debian's kernel: \(r.stderr)")
            return
        }
        #expect(r.status != 0)
        #expect(r.stderr.contains("no shell prompt within 2 s; killed"), "\(r.stderr)")
        let engine = try #require((try Self.readJSON(json)["engines"] as? [[String: Any]])?.first)
        let boot = try #require((engine["boots"] as? [[String: Any]])?.first)
        #expect((boot["failure"] as? String)?.contains("killed") == true)
    }
}
