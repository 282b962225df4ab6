import ArgumentParser
import VMM

/// The root command; `swiftvisor` and `swiftvisor-api` (OperatorCommands.swift) both start here.
package struct Swiftvisor: ParsableCommand {
    package static let configuration = CommandConfiguration(
        commandName: "swiftvisor",
        abstract: "A hypervisor toolkit: run guests on KVM or the software engine, with devices, snapshots and labs.",
        discussion: """
            Quick start:
              swiftvisor run hello                        boot the bundled 'hello' guest (KVM, else software)
              swiftvisor guests                           list the bundled guests
              swiftvisor run disk --disk disk.img         a guest using a virtio-blk disk image
              swiftvisor run counter --api-sock vm.sock   a VM with an HTTP API: swiftvisor ctl --help
              swiftvisor serve --api-sock vm.sock         configure and start a VM over the API: swiftvisor serve --help
              swiftvisor run --incoming tcp:127.0.0.1:7000   wait for a VM to migrate in: swiftvisor migrate --help
              swiftvisor lab pio-vs-mmio                  a scenario experiment: swiftvisor lab --help
              swiftvisor host                             what this host's /dev/kvm offers
              swiftvisor bench exits                      cost of a port-I/O exit, Swift loop vs C loop
            """,
        subcommands: [RunCommand.self, Serve.self, Ctl.self, Guests.self, Host.self, Bench.self, SnapshotCommand.self, MigrateCommand.self, BalloonCommand.self, LabCommand.self,
                      Measure.self, Verify.self]
    )

    package init() {}

    /// Stop signals and fatal faults are handled before anything else runs (ProcessLifecycle).
    package static func main() {
        ProcessLifecycle.install()
        // `run` is the start-up path (bench startup): parsed by its own table (RunOptions.swift),
        // without building swift-argument-parser's command tree by reflection.
        let arguments = Array(CommandLine.arguments.dropFirst())
        if arguments.first == "run" { Run.main(Array(arguments.dropFirst())) }
        if arguments == ["help", "run"] { Run.main(["--help"]) }
        main(nil)
    }
}

/// Exit statuses of `swiftvisor` itself (a guest's own status passes through unchanged).
package enum ToolStatus {
    /// The guest did not finish within --timeout.
    package static let timeout: Int32 = 124
    /// Swiftvisor or the engine failed (bad image, KVM error, triple fault).
    package static let failure: Int32 = 125
}

/// `--memory 64M` and friends.
struct MemoryArgument: ExpressibleByArgument {
    let bytes: UInt64
    init?(argument: String) {
        guard let b = MemorySize.parse(argument) else { return nil }
        bytes = b
    }
    static var defaultCompletionKind: CompletionKind { .default }
    /// `--help` shows the default as a size (64M).
    var defaultValueDescription: String { MemorySize.format(bytes) }

    /// Guest RAM a machine can have; a usage error otherwise.
    func validateGuestRAM() throws {
        guard bytes >= BootLayout.minRAM, bytes <= BootLayout.maxRAM, bytes % (2 << 20) == 0 else {
            throw ValidationError("--memory \(MemorySize.format(bytes)): guest RAM must be \(MemorySize.format(BootLayout.minRAM))–\(MemorySize.format(BootLayout.maxRAM)) and a multiple of 2M")
        }
    }
}

extension EngineChoice: ExpressibleByArgument {}

/// Prints one line to standard error. `newline: false` is a progress line: on a terminal it
/// is overwritten by the next one; elsewhere it is not printed.
package func printError(_ message: String, newline: Bool = true) {
    var stderr = StandardError()
    if newline {
        print(ProcessLifecycle.lineBreakBeforeMessage() + message, to: &stderr)
    } else if isatty(2) != 0 {
        print("\r\u{1B}[K" + message, terminator: "", to: &stderr)
    }
}

package struct StandardError: TextOutputStream {
    package init() {}

    package mutating func write(_ string: String) {
        var s = string
        s.withUTF8 { buf in
            var off = 0
            while off < buf.count {
                let n = Glibc.write(2, buf.baseAddress! + off, buf.count - off)
                if n <= 0 { if errno == EINTR { continue }; return }
                off += n
            }
        }
    }
}

#if canImport(Glibc)
import Glibc
#endif
