import ArgumentParser
import Logging
import VMM
import VirtCore
#if canImport(Glibc)
import Glibc
#endif

// `run` is the start-up path (`bench startup`). swift-argument-parser decodes a command by
// reflection over its property wrappers (metadata looked up by mangled name, conformance
// scans): ~5 ms of CPU before a guest could start. So `run`'s options are one table of
// descriptors that both a small parser here and `run --help` read; the ArgumentParser
// command `RunCommand` only puts `run` in the command tree (`swiftvisor --help`) and
// hands its arguments to the same parser.

/// One option of `run`: its name(s), value, help, and what it sets in `Run`.
struct RunOptionDescriptor: Sendable {
    enum Section: CaseIterable, Sendable {
        case options, operatorAPI, confidential
        /// The heading in `run --help`; nil: the plain OPTIONS list.
        var title: String? {
            switch self {
            case .options: return nil
            case .operatorAPI: return "Operator API, metrics and logs"
            case .confidential: return "Confidential VMs"
            }
        }
    }

    enum Kind: Sendable {
        /// `--name`: sets a Boolean.
        case flag(@Sendable (inout Run) -> Void)
        /// `--name VALUE` or `--name=VALUE`; `dashValues`: the next argument is the value even
        /// when it starts with '-' (`--memory -5` is a bad size, not a missing value).
        case value(valueName: String, dashValues: Bool, @Sendable (inout Run, String) throws -> Void)
    }

    /// Long names with their dashes, the first one shown first.
    var names: [String]
    var kind: Kind
    var help: String
    /// Shown as "(default: …)" in the help.
    var defaultValue: String? = nil
    var section: Section = .options
    /// Not in the help (test and benchmark hooks).
    var hidden = false

    /// "--memory <size>", as in messages and the help.
    var label: String {
        switch kind {
        case .flag: return names.joined(separator: ", ")
        case let .value(valueName, _, _): return names.joined(separator: ", ") + " <\(valueName)>"
        }
    }

    /// Shown after the help: the default, if any.
    var helpWithDefault: String { defaultValue.map { help + " (default: \($0))" } ?? help }
}

/// A usage error of `run` (exit 64): unknown option, missing or malformed value, or a
/// combination `Run.validate()` refuses.
struct RunUsageError: Error, CustomStringConvertible, Equatable {
    var description: String
    init(_ description: String) { self.description = description }
}

/// What the arguments of `run` ask for.
enum RunRequest {
    case run(Run)
    case help
}

extension Run {
    /// The guests: `run [<guest> ...]`.
    static let argumentHelp = ("guest", "Bundled guest name or path to an ELF file, optionally with its command line.")

    /// Every option of `run`. The parser and `run --help` read this table, and nothing else.
    static let options: [RunOptionDescriptor] = [
        .init(names: ["--kernel"], kind: .value(valueName: "file", dashValues: false) { run, v in run.kernel = v },
              help: "Boot a kernel on a PC platform instead of a guest: a Linux bzImage or vmlinux (x86 boot protocol, 64-bit entry, e820 map, ACPI tables; needs --memory 256M or so), or a multiboot (v1) kernel (ELF32 or a.out kludge, entered in 32-bit protected mode). Local APICs, I/O APIC, fw_cfg, 8259, COM1 (IRQ 4), PCI (ports 0xCF8/0xCFC and ECAM, MCFG) with virtio-pci devices, and isa-debug-exit at 0xF4 (exit status (code << 1) | 1, as QEMU). --cmdline is its command line, e.g. 'console=ttyS0'."),
        .init(names: ["--cpu"], kind: .value(valueName: "+flag,-flag", dashValues: true) { run, v in run.cpu = v },
              help: "With --kernel: CPU feature changes, as QEMU's -cpu flags: '-x2apic' hides x2APIC (CPUID and IA32_APIC_BASE.EXTD); '+x2apic' and '+tsc-deadline' are the default."),
        .init(names: ["--initrd"], kind: .value(valueName: "file", dashValues: false) { run, v in run.initrd = v },
              help: "With --kernel: the initrd (initramfs) of a Linux kernel, or the first multiboot module."),
        .init(names: ["--memory"], kind: .value(valueName: "size", dashValues: true) { run, v in
                  guard let size = MemoryArgument(argument: v) else { throw invalid(v, "--memory <size>") }
                  run.memory = size
                  run.memorySpecified = true
              },
              help: "Guest RAM, e.g. 64M, 1G (2M–3G, multiple of 2M).", defaultValue: "64M"),
        .init(names: ["--vcpus"], kind: .value(valueName: "n", dashValues: false) { run, v in run.vcpus = try integer(v, "--vcpus <n>") },
              help: "Number of vCPUs.", defaultValue: "1"),
        .init(names: ["--engine"], kind: .value(valueName: "engine", dashValues: false) { run, v in
                  guard let engine = EngineChoice(rawValue: v) else { throw invalid(v, "--engine <engine>", oneOf: EngineChoice.allCases.map(\.rawValue)) }
                  run.engine = engine
              },
              help: "Execution engine: kvm (hardware) or software (binary translator + interpreter, runs anywhere). Default: kvm when /dev/kvm is usable (with --kernel: and runs guest ring-0 code natively, which a nested KVM does not), otherwise software."),
        .init(names: ["--no-translation"], kind: .flag { $0.noTranslation = true },
              help: "Software engine: interpret every instruction instead of translating blocks to host code (the reference path; much slower)."),
        .init(names: ["--paging"], kind: .value(valueName: "nested|shadow", dashValues: false) { run, v in
                  guard let mode = PagingMode(rawValue: v) else { throw invalid(v, "--paging <nested|shadow>", oneOf: PagingMode.allCases.map(\.rawValue)) }
                  run.paging = mode
              },
              help: "Software engine: second-level translation, nested (the engine walks guest tables and the EPT model) or shadow (the VMM keeps shadow page tables; guest table writes, CR3 loads, INVLPG and shadow misses exit).",
              defaultValue: "nested"),
        .init(names: ["--timeout"], kind: .value(valueName: "seconds", dashValues: false) { run, v in
                  guard let seconds = Double(v) else { throw invalid(v, "--timeout <seconds>") }
                  run.timeout = seconds
              },
              help: "Stop the guest after this many seconds."),
        .init(names: ["--cmdline"], kind: .value(valueName: "text", dashValues: false) { run, v in run.cmdline = v },
              help: "Command line passed to the guest, e.g. 'count=1000 ring=3'."),
        .init(names: ["--disk"], kind: .value(valueName: "path[,ro][,vm=N]", dashValues: false) { run, v in run.disk.append(v) },
              help: "Add a virtio-blk disk: a raw image file; ',ro' read-only, ',vm=N' for the N-th VM. Repeatable."),
        .init(names: ["--net"], kind: .value(valueName: "attachment", dashValues: false) { run, v in run.net.append(v) },
              help: "Add a virtio-net NIC: switch:NAME or tap:IFNAME. Repeatable."),
        .init(names: ["--nic"], kind: .value(valueName: "attachment", dashValues: false) { run, v in run.nic.append(v) },
              help: "Add the emulated register-interface NIC: switch:NAME or tap:IFNAME."),
        .init(names: ["--incoming"], kind: .value(valueName: "address", dashValues: false) { run, v in run.incoming = v },
              help: "Wait for a VM migrating in at tcp:HOST:PORT or unix:PATH (see 'swiftvisor migrate') and run it; GUEST, if named, must be what arrives, and --memory, if given, is the most RAM accepted."),
        .init(names: ["--prealloc"], kind: .flag { $0.prealloc = true },
              help: "With --incoming and --memory: allocate that much RAM while waiting, so a pre-copy migration of that size streams into existing pages rather than allocating each as it arrives (QEMU's -mem-prealloc; the RAM is held even if the guest never uses it)."),
        .init(names: ["--balloon"], kind: .flag { $0.balloon = true },
              help: "Add a virtio-balloon device (set its size with 'swiftvisor ctl balloon', through --api-sock)."),
        .init(names: ["--partition"], kind: .value(valueName: "N:cpus[,fifo=P][,mlock]", dashValues: false) { run, v in run.partition.append(v) },
              help: "Partition VM N: pin its vCPU threads to host CPUs (joined by '+'), optionally at SCHED_FIFO priority P, its RAM locked. Repeatable."),
        .init(names: ["--virtio-console"], kind: .flag { $0.virtioConsole = true },
              help: "Add a virtio console connected to standard output."),
        .init(names: ["--vms"], kind: .value(valueName: "n", dashValues: false) { run, v in run.vms = try integer(v, "--vms <n>") },
              help: "With --kernel: boot this many VMs of the kernel side by side, each with the same options and its own devices (--disk …,vm=N gives a disk to VM N; --net switch:NAME puts every VM's NIC on the one switch). Their lines are prefixed [vm0], [vm1], …; --console-dir drives each one's shell.",
              defaultValue: "1"),
        .init(names: ["--console-dir"], kind: .value(valueName: "dir", dashValues: false) { run, v in run.consoleDir = v },
              help: "Also serve VM N's serial console on the Unix socket DIR/vmN.sock: a client reads the VM's output from then on and what it sends is typed into the VM (one client at a time; e.g. 'socat - UNIX-CONNECT:DIR/vm1.sock'). Standard input reaches vm0 only, so this is how each VM of a run is driven."),
        .init(names: ["--stats"], kind: .flag { $0.stats = true },
              help: "Print the exit statistics table to standard error when the guest stops."),
        .init(names: ["--stats-json"], kind: .value(valueName: "path", dashValues: false) { run, v in run.statsJSON = v },
              help: "Write the exit statistics as JSON to this file."),
        .init(names: ["--kvm-path"], kind: .value(valueName: "kvm-path", dashValues: false) { run, v in run.kvmPath = v },
              help: "The KVM device.", hidden: true),
        // Written by `bench startup`'s child runs (StartupBenchmark.swift).
        .init(names: ["--startup-report"], kind: .value(valueName: "path", dashValues: false) { run, v in run.startupReport = v },
              help: "Write the start-up report (JSON) when the guest stops.", hidden: true),
        // Tests only: a Swift runtime trap on vCPU 0's thread this long after the start (CLITests).
        .init(names: ["--crash-after-ms"], kind: .value(valueName: "ms", dashValues: false) { run, v in run.crashAfterMs = try integer(v, "--crash-after-ms <ms>") },
              help: "Crash vCPU 0's thread this long after the start.", hidden: true),

        .init(names: ["--api-sock", "--control"], kind: .value(valueName: "path", dashValues: false) { run, v in run.apiSock = v },
              help: OperatorOptions.Help.apiSock, section: .operatorAPI),
        .init(names: ["--api-tcp"], kind: .value(valueName: "host:port", dashValues: false) { run, v in run.apiTCP = v },
              help: OperatorOptions.Help.apiTCP, section: .operatorAPI),
        .init(names: ["--api-token-file"], kind: .value(valueName: "path", dashValues: false) { run, v in run.apiTokenFile = v },
              help: OperatorOptions.Help.apiTokenFile, section: .operatorAPI),
        .init(names: ["--metrics-file"], kind: .value(valueName: "path", dashValues: false) { run, v in run.metricsFile = v },
              help: OperatorOptions.Help.metricsFile, section: .operatorAPI),
        .init(names: ["--log-level"], kind: .value(valueName: "level", dashValues: false) { run, v in
                  guard let level = Logger.Level(rawValue: v) else { throw invalid(v, "--log-level <level>", oneOf: Logger.Level.allCases.map(\.rawValue)) }
                  run.logLevel = level
              },
              help: OperatorOptions.Help.logLevel, defaultValue: "info", section: .operatorAPI),

        .init(names: ["--confidential"], kind: .flag { $0.confidentialOptions.confidential = true },
              help: "Run as a confidential VM (software engine): guest memory encrypted under a per-VM key, with SEV-SNP's reverse map; the launch is measured.",
              section: .confidential),
        .init(names: ["--sev-only"], kind: .flag { $0.confidentialOptions.sevOnly = true },
              help: "With --confidential: encryption only (SEV), no reverse map — replay and remapping by the host go unnoticed.",
              section: .confidential),
        .init(names: ["--working-set"], kind: .value(valueName: "pages", dashValues: false) { run, v in
                  run.confidentialOptions.workingSet = try integer(v, "--working-set <pages>")
              },
              help: "With --confidential: pages of the decrypted working set (the engine's plaintext cache).", defaultValue: "1024", section: .confidential),
        .init(names: ["--attestation-report"], kind: .value(valueName: "path", dashValues: false) { run, v in
                  run.confidentialOptions.attestationReport = v
              },
              help: "With --confidential: write the attestation report (launch measurement signed with this host's P-384 key) to this file.",
              section: .confidential),
    ]

    private static func invalid(_ value: String, _ label: String, oneOf choices: [String] = []) -> RunUsageError {
        let choice = choices.isEmpty ? "" : "; use " + choices.map { "'\($0)'" }.joined(separator: ", ")
        return RunUsageError("The value '\(value)' is invalid for '\(label)'\(choice)")
    }

    private static func integer(_ value: String, _ label: String) throws(RunUsageError) -> Int {
        guard let n = Int(value) else { throw invalid(value, label) }
        return n
    }

    /// The arguments after `run`: a run to carry out (validated) or a request for help.
    static func parse(_ arguments: [String]) throws(RunUsageError) -> RunRequest {
        var run = Run()
        var index = 0
        var positionalOnly = false
        while index < arguments.count {
            let argument = arguments[index]
            index += 1
            if positionalOnly || !argument.hasPrefix("-") || argument == "-" {
                run.guests.append(argument)
                continue
            }
            if argument == "--" { positionalOnly = true; continue }
            if argument == "-h" || argument == "--help" { return .help }
            let name: Substring, inlineValue: Substring?
            if let equals = argument.firstIndex(of: "=") {
                (name, inlineValue) = (argument[..<equals], argument[argument.index(after: equals)...])
            } else {
                (name, inlineValue) = (argument[...], nil)
            }
            guard let option = options.first(where: { $0.names.contains { $0 == name } }) else {
                throw RunUsageError("Unknown option '\(name)'")
            }
            switch option.kind {
            case let .flag(set):
                guard inlineValue == nil else { throw RunUsageError("The flag '\(name)' does not take a value") }
                set(&run)
            case let .value(_, dashValues, set):
                let value: String
                if let inlineValue {
                    value = String(inlineValue)
                } else if index < arguments.count, dashValues || !arguments[index].hasPrefix("-") || arguments[index] == "-" {
                    value = arguments[index]
                    index += 1
                } else {
                    throw RunUsageError("Missing value for '\(option.label)'")
                }
                do { try set(&run, value) } catch let error as RunUsageError { throw error } catch { throw RunUsageError("\(error)") }
            }
        }
        do { try run.validate() } catch let error as ValidationError {
            throw RunUsageError(error.message)
        } catch {
            throw RunUsageError("\(error)")
        }
        return .run(run)
    }

    /// `run`'s entry point in both executables: parses with the table above, prints help or
    /// a usage error (one line and the usage, exit 64), or runs.
    static func main(_ arguments: [String]) -> Never {
        let request: RunRequest
        do { request = try parse(arguments) } catch {
            var stderr = StandardError()
            print("Error: \(error.description)\n\(usage)\n  See 'swiftvisor run --help' for more information.", to: &stderr)
            exit(ExitCode.validationFailure.rawValue)
        }
        switch request {
        case .help:
            print(helpText(width: terminalWidth()), terminator: "")
            exit(0)
        case let .run(run):
            do { try run.run() } catch let code as ExitCode {
                exit(code.rawValue)
            } catch let error as ValidationError {
                printError("Error: \(error.message)")
                exit(ExitCode.validationFailure.rawValue)
            } catch {
                printError("Error: \(error)")
                exit(EXIT_FAILURE)
            }
            exit(0)
        }
    }

    static let usage = "Usage: swiftvisor run [<options>] [<guest> ...]"

    /// Columns for the help: $COLUMNS, else the terminal's width, else 80.
    static func terminalWidth() -> Int {
        if let text = getenv("COLUMNS"), let columns = Int(String(cString: text)), columns > 20 { return columns }
        var size = winsize()
        if ioctl(1, UInt(TIOCGWINSZ), &size) == 0, size.ws_col > 20 { return Int(size.ws_col) }
        return 80
    }

    /// `run --help`: overview, discussion, usage, the guests and every visible option of the table.
    static func helpText(width: Int) -> String {
        var text = wrap("OVERVIEW: " + abstract, width: width, indent: 0) + "\n\n"
        for paragraph in discussion.split(separator: "\n\n") {
            text += wrap(String(paragraph), width: width, indent: 0) + "\n\n"
        }
        text += "USAGE: swiftvisor run [<options>] [<guest> ...]\n\nARGUMENTS:\n"
        text += entry("<\(argumentHelp.0)> ...", argumentHelp.1, width: width) + "\n"
        for section in RunOptionDescriptor.Section.allCases {
            text += (section.title?.uppercased() ?? "OPTIONS") + ":\n"
            for option in options where option.section == section && !option.hidden {
                text += entry(option.label, option.helpWithDefault, width: width)
            }
            if section == .options { text += entry("-h, --help", "Show help information.", width: width) }
            text += "\n"
        }
        return text
    }

    /// "  label      help…", the help wrapped in its column (on the next line after a long label).
    private static func entry(_ label: String, _ help: String, width: Int) -> String {
        let column = 26
        let head = "  " + label
        let body = wrap(help, width: width, indent: column)
        if head.count + 2 <= column {
            return head + String(repeating: " ", count: column - head.count) + body.dropFirst(column) + "\n"
        }
        return head + "\n" + body + "\n"
    }

    /// Words of `text` in lines of at most `width` columns, each indented by `indent` spaces.
    private static func wrap(_ text: String, width: Int, indent: Int) -> String {
        let margin = String(repeating: " ", count: indent)
        var lines: [String] = []
        var line = ""
        for word in text.split(separator: " ") {
            if !line.isEmpty, indent + line.count + 1 + word.count > width {
                lines.append(margin + line)
                line = ""
            }
            line += (line.isEmpty ? "" : " ") + word
        }
        lines.append(margin + line)
        return lines.joined(separator: "\n")
    }
}

/// `run` in swift-argument-parser's command tree, so `swiftvisor --help` lists it and `help run`
/// finds it; the arguments go to `Run.main`, which `Swiftvisor.main` also calls directly.
struct RunCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "run", abstract: Run.abstract, discussion: Run.discussion)

    @Argument(parsing: .captureForPassthrough, help: ArgumentHelp(Run.argumentHelp.1, valueName: Run.argumentHelp.0))
    var arguments: [String] = []

    func run() throws { Run.main(arguments) }
}
