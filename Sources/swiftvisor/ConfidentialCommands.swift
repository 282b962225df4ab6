import ArgumentParser
import FoundationEssentials
import VMM
import VirtCore

/// `run --confidential …`: a confidential VM (S11, docs/confidential-vm.md). Set by `run`'s
/// option table (RunOptions.swift), which holds the options' help.
struct ConfidentialArguments {
    var confidential = false
    var sevOnly = false
    /// Pages of the decrypted working set.
    var workingSet = 1024
    var attestationReport: String?

    var mode: ConfidentialMode? { confidential ? (sevOnly ? .sev : .snp) : nil }

    func validate() throws {
        if !confidential && (sevOnly || attestationReport != nil) {
            throw ValidationError("--sev-only and --attestation-report need --confidential")
        }
        guard workingSet >= 16 else { throw ValidationError("--working-set must be at least 16 pages") }
    }

    /// What signs the launch measurement into `attestationReport` once a machine launches:
    /// nothing without it; with it, in `swiftvisor`, the process first becomes swiftvisor-api.
    func reportAttacher() throws -> (Machine, String) throws -> Void {
        guard let path = attestationReport else { return { _, _ in } }
        let implementation = try AttestationCommands.resolved()
        return { machine, guest in
            // A missing or broken key stops the run before it starts.
            let write = try implementation.reportWriter(path: path, guest: guest)
            machine.onLaunch = { measurement in
                do {
                    try write(measurement)
                } catch {
                    printError("swiftvisor: error: cannot write the attestation report: \(error)")
                }
            }
        }
    }
}

struct Measure: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "measure",
        abstract: "Compute a confidential VM's launch measurement offline.",
        discussion: """
            The SHA-256 digest 'run --confidential' computes while it encrypts the initial image: the \
            VMM's pages below 1 MiB (boot info, command line, page tables with their C-bits), the \
            guest's segments and the boot vCPU's entry state. It matches a run with the same \
            --memory and --cmdline and no devices (devices are listed in the measured boot info).
            """)

    @Argument(help: "A bundled guest's name or an ELF file.")
    var guest: String

    @Option(name: .long, help: ArgumentHelp("Guest RAM, as for 'run'.", valueName: "size"))
    var memory = MemoryArgument(argument: "64M")!

    @Option(name: .long, help: ArgumentHelp("The guest's command line, as for 'run'.", valueName: "text"))
    var cmdline = ""

    @Flag(name: .long, help: "Measure for an SEV-only launch (the mode is part of the digest).")
    var sevOnly = false

    @Flag(name: .long, help: "Print the measurement as JSON.")
    var json = false

    func run() throws {
        do {
            let image = try GuestProgram.load(guest)
            let m = try ConfidentialLaunch.measure(image: image, memorySize: memory.bytes, commandLine: cmdline, mode: sevOnly ? .sev : .snp)
            if json {
                let encoder = JSONEncoder()
                encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
                print(String(decoding: try encoder.encode(m), as: UTF8.self))
            } else {
                print("\(m.digest)  \(guest) (\(m.mode), \(m.measuredPages) pages)")
            }
        } catch {
            printError("swiftvisor: error: \(error)")
            throw ExitCode(ToolStatus.failure)
        }
    }
}

struct Verify: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "verify",
        abstract: "Check a confidential VM's attestation report.",
        discussion: """
            Checks the report's P-384 signature and that it was signed by this host's attestation key \
            (or by --host-key), and, with --measurement, that the launch digest is the expected one \
            (see 'swiftvisor measure'). Exit status 0: the report verifies; 1: it does not.
            """)

    @Argument(help: "The report 'run --attestation-report' wrote.")
    var report: String

    @Option(name: .long, help: ArgumentHelp("The launch digest to expect (hex, from 'swiftvisor measure').", valueName: "hex"))
    var measurement: String?

    @Option(name: .long, help: ArgumentHelp("Trust this host key (hex X9.63, as in a report) instead of this host's own.", valueName: "hex"))
    var hostKey: String?

    func run() throws {
        let implementation = try AttestationCommands.resolved()
        do {
            print(try implementation.verify(reportPath: report, expectedDigest: measurement, hostKeyHex: hostKey))
        } catch {
            printError("swiftvisor: verify: \(error)")
            throw ExitCode(1)
        }
    }
}
