import Foundation
import TestSupport
import Testing

/// S11 as a user meets it: `run --confidential`, `measure`, `verify`.
@Suite struct CLIConfidentialTests {
    @Test func computeRunsConfidentialPrintsTheSameAndItsReportVerifies() throws {
        let home = FileManager.default.temporaryDirectory.appendingPathComponent("swiftvisor-cvm-\(getpid())").path
        defer { try? FileManager.default.removeItem(atPath: home) }
        let env = ["/usr/bin/env", "SWIFTVISOR_HOME=\(home)"]
        let report = home + "/report.json"
        let plain = try swiftvisor(["run", "compute", "--engine", "software"])
        try FileManager.default.createDirectory(atPath: home, withIntermediateDirectories: true)
        let secret = try swiftvisor(["run", "compute", "--engine", "software", "--confidential", "--attestation-report", report], launcher: env)
        #expect(secret.status == 0, "\(secret.stderr)")
        #expect(secret.stdout == plain.stdout)
        #expect(FileManager.default.fileExists(atPath: home + "/attestation-p384.pem"))

        let measured = try swiftvisor(["measure", "compute", "--json"])
        #expect(measured.status == 0)
        let digest = try #require(try JSONSerialization.jsonObject(with: Data(measured.stdout.utf8)) as? [String: Any])["digest"] as? String
        let verified = try swiftvisor(["verify", report, "--measurement", try #require(digest)], launcher: env)
        #expect(verified.status == 0, "\(verified.stderr)")
        #expect(verified.stdout.hasPrefix("verified: compute launched snp with measurement \(digest!)"))

        // Another digest expected, or a forged report: one clear line, status 1.
        let wrong = try swiftvisor(["verify", report, "--measurement", String(repeating: "ab", count: 32)], launcher: env)
        #expect(wrong.status == 1)
        #expect(wrong.stderr.hasPrefix("swiftvisor: verify: the launch digest"))
        var json = try String(contentsOfFile: report, encoding: .utf8)
        json = json.replacingOccurrences(of: digest!, with: String(repeating: "0", count: 64))
        try json.write(toFile: report, atomically: true, encoding: .utf8)
        let forged = try swiftvisor(["verify", report], launcher: env)
        #expect(forged.status == 1)
        #expect(forged.stderr == "swiftvisor: verify: the report's signature does not verify\n")
    }

    @Test func vconsoleEchoesThroughTheBounceRegionAsAConfidentialVM() throws {
        let r = try swiftvisor(["run", "vconsole", "--virtio-console", "--confidential", "--timeout", "60"], stdin: "secret line\n")
        #expect(r.status == 0, "\(r.stderr)")
        #expect(r.stdout.contains("Hello through virtio-console!"))
        #expect(r.stdout.contains("vconsole echo: secret line"))
    }

    @Test(.requiresKVM("the KVM engine's refusal is the point"))
    func confidentialOnKVMIsOneClearLine() throws {
        let r = try swiftvisor(["run", "hello", "--engine", "kvm", "--confidential"])
        #expect(r.status == 125)
        #expect(r.stderr == "swiftvisor: error: the kvm engine cannot encrypt guest memory (confidential VMs; the host CPU has no SEV), which a confidential VM needs\n")
    }

    @Test func sevOnlyWithoutConfidentialIsAUsageError() throws {
        let r = try swiftvisor(["run", "hello", "--sev-only"])
        #expect(r.status == 64)
        #expect(r.stderr.contains("--sev-only and --attestation-report need --confidential"))
    }
}
