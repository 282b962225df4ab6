import Foundation
import TestSupport
import Testing

/// `swiftvisor` leaves the operator API's libraries to its sibling `swiftvisor-api`.
@Suite struct CLIExecutablesTests {
    let siblingPath = URL(fileURLWithPath: swiftvisorPath).deletingLastPathComponent().appendingPathComponent("swiftvisor-api").path

    /// Whether a Swift module is linked into a binary: its module descriptor carries its name.
    func links(_ binary: String, module: String) throws -> Bool {
        let data = try Data(contentsOf: URL(fileURLWithPath: binary), options: .alwaysMapped)
        return data.range(of: Data(("\0" + module + "\0").utf8)) != nil
    }

    @Test func theOperatorAPIsLibrariesAreOnlyInTheSibling() throws {
        for module in ["NIOCore", "NIOPosix", "NIOHTTP1", "Prometheus", "OperatorAPI"] {
            #expect(try !links(swiftvisorPath, module: module), "swiftvisor links \(module)")
            #expect(try links(siblingPath, module: module), "swiftvisor-api lacks \(module)")
        }
    }

    /// Nor does it link swift-crypto or the full Foundation (with ICU) that swift-crypto imports on
    /// Linux: the attestation commands are the sibling's too. FoundationEssentials is fine. Foundation
    /// is looked for as a module (static stdlib) and as a shared library (dynamic).
    @Test func cryptoAndFoundationAreOnlyInTheSibling() throws {
        for module in ["Crypto", "Attestation"] {
            #expect(try !links(swiftvisorPath, module: module), "swiftvisor links \(module)")
            #expect(try links(siblingPath, module: module), "swiftvisor-api lacks \(module)")
        }
        for name in ["Foundation", "FoundationInternationalization", "libFoundation.so", "libFoundationInternationalization.so", "lib_FoundationICU.so"] {
            #expect(try !links(swiftvisorPath, module: name), "swiftvisor links \(name)")
        }
        #expect(try links(siblingPath, module: "Foundation") || links(siblingPath, module: "libFoundation.so"), "the check would not see Foundation")
    }

    /// Without the sibling, `run` still works and the operator commands say what is missing.
    @Test func aMissingSiblingIsOneClearLine() throws {
        let dir = NSTemporaryDirectory() + "swiftvisor-alone-\(getpid())"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let alone = dir + "/swiftvisor"
        try FileManager.default.copyItem(atPath: swiftvisorPath, toPath: alone)
        let ran = try swiftvisor(["run", "hello", "--engine", "software"], executable: alone)
        #expect(ran.status == 0, "\(ran.stderr)")
        #expect(ran.stdout.contains("Hello from Swiftvisor!"))
        let socket = dir + "/vm.sock"
        for args in [["serve", "--api-sock", socket], ["run", "hello", "--api-sock", socket], ["ctl", "--api-sock", socket, "status"],
                     ["verify", dir + "/report.json"], ["run", "hello", "--confidential", "--attestation-report", dir + "/report.json"]] {
            let r = try swiftvisor(args, executable: alone)
            #expect(r.status == 125, "\(args): \(r.stderr)")
            let lines = r.stderr.split(separator: "\n")
            #expect(lines.count == 1 && lines[0].hasPrefix("swiftvisor: error: cannot start \(dir)/swiftvisor-api (No such file or directory)"), "\(r.stderr)")
            #expect(!FileManager.default.fileExists(atPath: socket))
        }
        // Usage errors and help need no sibling.
        let usage = try swiftvisor(["serve"], executable: alone)
        #expect(usage.status == 64 && usage.stderr.contains("serve needs --api-sock PATH"))
        let help = try swiftvisor(["ctl", "--help"], executable: alone)
        #expect(help.status == 0 && help.stdout.contains("USAGE: swiftvisor ctl"))
    }
}
