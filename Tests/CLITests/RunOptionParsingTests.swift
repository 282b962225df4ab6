import Logging
@testable import SwiftvisorCLI
import Testing
import VMM
import VirtCore

/// `run`'s own parser (RunOptions.swift): every option of its table sets what the
/// swift-argument-parser declaration it replaced set, and bad input is one clear usage error.
@Suite struct RunOptionParsingTests {
    private func parsed(_ arguments: [String]) throws -> Run {
        guard case let .run(run) = try Run.parse(arguments) else {
            Issue.record("\(arguments) asked for help")
            return Run()
        }
        return run
    }

    private func usageError(_ arguments: [String]) -> String? {
        do { _ = try Run.parse(arguments) } catch { return error.description }
        return nil
    }

    /// One case per option (and per spelling), with what it must set.
    private static let cases: [(arguments: [String], holds: @Sendable (Run) -> Bool)] = [
        (["--kernel", "bzImage"], { $0.kernel == "bzImage" && $0.guests.isEmpty }),
        (["--kernel", "bzImage", "--cpu", "-x2apic"], { $0.cpu == "-x2apic" }),
        (["--kernel", "bzImage", "--initrd", "initrd.img"], { $0.initrd == "initrd.img" }),
        (["hello", "--memory", "128M"], { $0.memory.bytes == 128 << 20 && $0.memorySpecified }),
        (["hello", "--memory=1G"], { $0.memory.bytes == 1 << 30 && $0.memorySpecified }),
        (["hello", "--vcpus", "4"], { $0.vcpus == 4 }),
        (["hello", "--engine", "software"], { $0.engine == .software }),
        (["hello", "--engine", "kvm"], { $0.engine == .kvm }),
        (["hello", "--engine", "software", "--no-translation"], { $0.noTranslation }),
        (["hello", "--engine", "software", "--paging", "shadow"], { $0.paging == .shadow }),
        (["hello", "--timeout", "2.5"], { $0.timeout == 2.5 }),
        (["hello", "--cmdline", "count=1000 ring=3"], { $0.cmdline == "count=1000 ring=3" }),
        (["disk", "--disk", "a.img", "--disk", "b.img,ro"], { $0.disk == ["a.img", "b.img,ro"] }),
        (["net-ping", "--net", "switch:lan", "--net=tap:tap0"], { $0.net == ["switch:lan", "tap:tap0"] }),
        (["hello", "--nic", "switch:lan"], { $0.nic == ["switch:lan"] }),
        (["--incoming", "tcp:127.0.0.1:7000"], { $0.incoming == "tcp:127.0.0.1:7000" && !$0.memorySpecified }),
        (["--incoming", "unix:/tmp/m.sock", "--memory", "64M", "--prealloc"], { $0.prealloc && $0.memorySpecified }),
        (["counter", "--balloon"], { $0.balloon }),
        (["hello", "counter", "--partition", "1:0+1,fifo=5,mlock"], { $0.partition == ["1:0+1,fifo=5,mlock"] && $0.guests == ["hello", "counter"] }),
        (["hello", "--virtio-console"], { $0.virtioConsole }),
        (["--kernel", "k", "--vms", "3"], { $0.vms == 3 }),
        (["--kernel", "k", "--console-dir", "/tmp/d"], { $0.consoleDir == "/tmp/d" }),
        (["hello", "--stats"], { $0.stats }),
        (["hello", "--stats-json", "out.json"], { $0.statsJSON == "out.json" }),
        (["hello", "--kvm-path", "/nonexistent/kvm"], { $0.kvmPath == "/nonexistent/kvm" }),
        (["hello", "--startup-report", "r.json"], { $0.startupReport == "r.json" }),
        (["hello", "--crash-after-ms", "20"], { $0.crashAfterMs == 20 }),
        (["counter", "--api-sock", "vm.sock"], { $0.apiSock == "vm.sock" && $0.serves && $0.operatorOptions.apiSock == "vm.sock" }),
        (["counter", "--control", "vm.sock"], { $0.apiSock == "vm.sock" }),
        (["counter", "--api-tcp", "127.0.0.1:8080", "--api-token-file", "token"],
         { $0.apiTCP == "127.0.0.1:8080" && $0.apiTokenFile == "token" && $0.serves && $0.operatorOptions.apiTCP == "127.0.0.1:8080" }),
        (["hello", "--metrics-file", "m.prom"], { $0.metricsFile == "m.prom" && !$0.serves && $0.operatorOptions.metricsFile == "m.prom" }),
        (["hello", "--log-level", "debug"], { $0.logLevel == .debug && $0.operatorOptions.logLevel == .debug }),
        (["hello", "--engine", "software", "--confidential"], { $0.confidentialOptions.mode == .snp }),
        (["hello", "--confidential", "--sev-only"], { $0.confidentialOptions.mode == .sev }),
        (["hello", "--confidential", "--working-set", "64"], { $0.confidentialOptions.workingSet == 64 }),
        (["hello", "--confidential", "--attestation-report", "r.bin"], { $0.confidentialOptions.attestationReport == "r.bin" }),
    ]

    @Test func everyOptionSetsWhatItDid() throws {
        for c in Self.cases {
            let run = try parsed(c.arguments)
            #expect(c.holds(run), "\(c.arguments)")
        }
    }

    /// A new option in the table needs its case above.
    @Test func everyOptionOfTheTableHasACase() {
        let tested = Set(Self.cases.flatMap { $0.arguments }.map { String($0.split(separator: "=")[0]) })
        for option in Run.options {
            for name in option.names { #expect(tested.contains(name), "no case for \(name)") }
        }
    }

    /// The defaults of the swift-argument-parser declarations.
    @Test func defaults() throws {
        let run = try parsed(["hello"])
        #expect(run.guests == ["hello"])
        #expect(run.memory.bytes == 64 << 20 && !run.memorySpecified)
        #expect(run.vcpus == 1 && run.engine == nil && !run.noTranslation && run.paging == .nested)
        #expect(run.timeout == nil && run.cmdline == "" && run.disk.isEmpty && run.net.isEmpty && run.nic.isEmpty)
        #expect(run.apiSock == nil && run.apiTCP == nil && run.apiTokenFile == nil && run.metricsFile == nil && run.logLevel == .info)
        #expect(run.incoming == nil && !run.prealloc && !run.balloon && run.partition.isEmpty && !run.virtioConsole)
        #expect(run.vms == 1 && run.consoleDir == nil)
        #expect(run.confidentialOptions.mode == nil && run.confidentialOptions.workingSet == 1024 && run.confidentialOptions.attestationReport == nil)
        #expect(!run.stats && run.statsJSON == nil && run.kvmPath == "/dev/kvm" && run.startupReport == nil && run.crashAfterMs == nil)
    }

    @Test func guestsWithTheirCommandLinesAndAfterDoubleDash() throws {
        let run = try parsed(["net-ping pong=1 count=5", "--engine", "software", "--", "--odd-name"])
        #expect(run.guests == ["net-ping pong=1 count=5", "--odd-name"])
        #expect(run.engine == .software)
    }

    @Test func helpAnywhere() throws {
        for arguments in [["--help"], ["-h"], ["hello", "--memory", "128M", "--help"]] {
            guard case .help = try Run.parse(arguments) else { Issue.record("\(arguments)"); continue }
        }
    }

    @Test func unknownOptionsMissingAndBadValues() {
        #expect(usageError(["hello", "--memroy", "64M"]) == "Unknown option '--memroy'")
        #expect(usageError(["hello", "-x"]) == "Unknown option '-x'")
        #expect(usageError(["hello", "--vcpus"]) == "Missing value for '--vcpus <n>'")
        #expect(usageError(["hello", "--vcpus", "--stats"]) == "Missing value for '--vcpus <n>'")
        #expect(usageError(["hello", "--vcpus", "two"]) == "The value 'two' is invalid for '--vcpus <n>'")
        #expect(usageError(["hello", "--memory", "-5"]) == "The value '-5' is invalid for '--memory <size>'")
        #expect(usageError(["hello", "--memory"]) == "Missing value for '--memory <size>'")
        #expect(usageError(["hello", "--timeout", "soon"]) == "The value 'soon' is invalid for '--timeout <seconds>'")
        #expect(usageError(["hello", "--engine", "qemu"]) == "The value 'qemu' is invalid for '--engine <engine>'; use 'kvm', 'software'")
        #expect(usageError(["hello", "--paging", "sideways"])?.hasPrefix("The value 'sideways' is invalid for '--paging <nested|shadow>'") == true)
        #expect(usageError(["hello", "--log-level", "loud"])?.hasPrefix("The value 'loud' is invalid for '--log-level <level>'") == true)
        #expect(usageError(["hello", "--stats=yes"]) == "The flag '--stats' does not take a value")
    }

    /// What `validate()` refuses is a usage error too, with its own message.
    @Test func refusedCombinations() {
        #expect(usageError([]) == "name at least one guest")
        #expect(usageError(["hello", "--memory", "3M"])?.contains("guest RAM must be") == true)
        #expect(usageError(["hello", "--vcpus", "0"])?.contains("--vcpus must be between 1 and") == true)
        #expect(usageError(["hello", "--engine", "kvm", "--no-translation"])?.contains("--no-translation applies to the software engine") == true)
        #expect(usageError(["hello", "--sev-only"]) == "--sev-only and --attestation-report need --confidential")
        #expect(usageError(["hello", "--api-tcp", "127.0.0.1:8080"])?.contains("--api-tcp needs --api-token-file") == true)
        #expect(usageError(["counter", "--prealloc", "--memory", "64M"])?.contains("--prealloc needs --incoming and --memory") == true)
        #expect(usageError(["hello", "--confidential", "--working-set", "8"]) == "--working-set must be at least 16 pages")
    }

    /// The help lists every visible option of the table, with its value and default, and no hidden one.
    @Test func helpComesFromTheTable() {
        let help = Run.helpText(width: 1000)
        for option in Run.options {
            // A long label has its help on the next line.
            let listed = help.contains("  " + option.label + " ") || help.contains("  " + option.label + "\n")
            #expect(listed != option.hidden, "\(option.label)")
            if !option.hidden { #expect(help.contains(option.helpWithDefault), "\(option.label)") }
        }
        #expect(help.contains("(default: 64M)") && help.contains("OPERATOR API, METRICS AND LOGS:") && help.contains("CONFIDENTIAL VMS:"))
        // Wrapped to the width asked for.
        #expect(Run.helpText(width: 60).split(separator: "\n").allSatisfy { $0.count <= 60 || !$0.contains(" ") })
    }
}

/// The same, through the executable: `run` stays in the command tree, and its usage errors are
/// one `Error:` line, the usage and exit 64, as swift-argument-parser's are.
@Suite struct RunCommandLineTests {
    @Test func theRootHelpListsRunAndHelpRunIsItsHelp() throws {
        let root = try swiftvisor(["--help"])
        #expect(root.status == 0 && root.stdout.contains("\n  run "), "\(root.stdout)")
        let help = try swiftvisor(["help", "run"])
        #expect(help.status == 0 && help.stdout.contains("--vcpus <n>") && help.stdout.contains("CONFIDENTIAL VMS:"), "\(help.stdout)")
        #expect(try swiftvisor(["run", "-h"]).stdout == help.stdout)
    }

    @Test func usageErrorsAreOneLineAndStatus64() throws {
        for (arguments, message) in [(["run", "hello", "--bogus"], "Error: Unknown option '--bogus'"),
                                     (["run", "hello", "--vcpus"], "Error: Missing value for '--vcpus <n>'"),
                                     (["run", "hello", "--engine", "qemu"], "Error: The value 'qemu' is invalid for '--engine <engine>'")] {
            let r = try swiftvisor(arguments)
            #expect(r.status == 64, "\(arguments)")
            let lines = r.stderr.split(separator: "\n")
            #expect(lines.first?.hasPrefix(message) == true, "\(arguments): \(r.stderr)")
            #expect(lines.count == 3 && lines[1].hasPrefix("Usage: swiftvisor run"), "\(r.stderr)")
            #expect(r.stdout.isEmpty)
        }
    }
}
