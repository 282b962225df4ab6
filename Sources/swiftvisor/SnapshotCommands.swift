import ArgumentParser
import FoundationEssentials
import VMM

package struct SnapshotCommand: ParsableCommand {
    package init() {}

    package static let configuration = CommandConfiguration(
        commandName: "snapshot",
        abstract: "Copy-on-write snapshots: take one from a running VM, restore (clone) it, inspect a file.",
        discussion: """
            Start a VM with an API socket:      swiftvisor run counter --api-sock /tmp/vm.sock
            Snapshot it while it runs:          swiftvisor snapshot create --socket /tmp/vm.sock counter.snap
            Restore it (as often as you like):  swiftvisor snapshot restore counter.snap
            The guest keeps running during 'create': only saving the vCPU state and arming write \
            protection stops it; a page it writes before the writer reaches it is copied first.
            """,
        subcommands: [Create.self, Restore.self, Inspect.self])

    package struct Create: ParsableCommand {
        package init() {}

        package static let configuration = CommandConfiguration(commandName: "create", abstract: "Snapshot a running VM through its API socket (PUT /snapshot/create).")

        @Option(name: .long, help: ArgumentHelp("The VM's API socket (swiftvisor run … --api-sock PATH).", valueName: "path"))
        package var socket: String

        @Argument(help: "Snapshot file to write (replaced atomically).")
        package var file: String

        @Option(name: .long, help: "A note kept in the snapshot.")
        package var note = ""

        package func run() throws { try OperatorCommands.run(self) }
    }

    struct Restore: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "restore",
            abstract: "Run a VM from a snapshot file; it continues where the snapshot was taken.",
            discussion: "The file is only read, so it can be restored any number of times (clones). Exit statuses as for 'run'.")

        @Argument(help: "Snapshot file.")
        var file: String

        @Flag(name: .long, help: "Fill RAM on first touch (userfaultfd) instead of reading it all first.")
        var lazy = false

        @Option(name: .long, help: ArgumentHelp("Stop the guest after this many seconds.", valueName: "seconds"))
        var timeout: Double?

        @OptionGroup(title: "Operator API, metrics and logs")
        var api: OperatorOptions

        func run() throws {
            let startSession = try OperatorCommands.sessionStarter(api)
            let machine: Machine
            do {
                let snapshot = try SnapshotFile(path: file)
                let engine = try EngineSelection.make(EngineChoice(rawValue: snapshot.metadata.engine) ?? .software)
                machine = try Machine(restoring: snapshot, engine: engine, lazy: lazy, timeoutSeconds: timeout,
                                      serialOutput: ConsoleOutput.write)
            } catch {
                printError("swiftvisor: error: \(error)")
                throw ExitCode(ToolStatus.failure)
            }
            let endSession = try startSession(machine)
            defer { endSession() }
            let result = try ProcessLifecycle.stoppingOnSignal([machine]) { try machine.run() }
            machine.flushDevices().forEach { printError("swiftvisor: error: \($0)") }
            if let signal = ProcessLifecycle.stopSignal {
                ProcessLifecycle.announceStop(signal)
                throw ExitCode(ProcessLifecycle.exitStatus(signal))
            }
            if case let .exitPort(status) = result.stopReason { throw ExitCode(Int32(status)) }
            printError("swiftvisor: \(result.stopReason.summary)")
            if case .timeout = result.stopReason { throw ExitCode(ToolStatus.timeout) }
            throw ExitCode(ToolStatus.failure)
        }
    }

    struct Inspect: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "inspect",
            abstract: "Describe a snapshot file and verify its checksums.",
            discussion: "Exits 0 when every checksum passes, 125 when the file or its guest memory is damaged.")

        @Argument(help: "Snapshot file.")
        var file: String

        func run() throws {
            let intact: Bool
            do {
                let (text, memoryIntact) = try SnapshotFile.inspection(path: file)
                print(text, terminator: text.hasSuffix("\n") ? "" : "\n")
                intact = memoryIntact
            } catch {
                printError("swiftvisor: error: \(error)")
                throw ExitCode(ToolStatus.failure)
            }
            guard intact else {
                printError("swiftvisor: error: \(file): guest memory fails its checksums; the snapshot is damaged")
                throw ExitCode(ToolStatus.failure)
            }
        }
    }
}
