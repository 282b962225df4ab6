import ArgumentParser
import Dispatch
import FoundationEssentials
import OperatorAPI
import VMM
#if canImport(Glibc)
import Glibc
#endif

struct MigrateCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "migrate",
        abstract: "Live-migrate a running VM to a destination started with 'run --incoming'.",
        discussion: """
            The VM is reached through its API socket (run … --api-sock PATH; PUT /migrate). \
            Pre-copy (the default): RAM is sent while the guest runs, then the \
            pages it dirtied, round after round, until the rest fits \
            --max-downtime-ms at the measured bandwidth (or --max-rounds is \
            reached); then the guest pauses and the rest goes with the vCPU and \
            device state. --postcopy: the state goes first, the guest runs at the \
            destination at once and pulls its pages. The engines may differ (kvm → \
            software and back). If anything fails before the destination \
            confirms, the VM resumes here. If a post-copy stream breaks after the \
            switch-over, the guest waits at the destination for the pages only \
            this side holds, and this process keeps them: --resume reconnects \
            (to the destination's --incoming address) and finishes.

            Example (two terminals):
              swiftvisor run --incoming tcp:127.0.0.1:7000 --engine software
              swiftvisor run counter --api-sock /tmp/vm.sock
              swiftvisor migrate --socket /tmp/vm.sock tcp:127.0.0.1:7000
            """
    )

    @Option(name: .long, help: ArgumentHelp("The VM's API socket (run --api-sock PATH).", valueName: "path"))
    var socket: String

    @Argument(help: ArgumentHelp("Destination: tcp:HOST:PORT or unix:PATH.", valueName: "destination"))
    var destination: String

    @Option(name: .long, help: ArgumentHelp("Largest acceptable pause of the guest, in milliseconds (default 300).", valueName: "ms"))
    var maxDowntimeMs: Double?

    @Option(name: .long, help: ArgumentHelp("Dirty rounds before the guest is stopped regardless (default 30).", valueName: "n"))
    var maxRounds: Int?

    @Flag(name: .long, help: "Post-copy: move the vCPU and device state first and run the guest at the destination at once; its pages follow on demand (each first touch asks the source) and in the background.")
    var postcopy = false

    @Flag(name: .long, help: "Pre-copy: when rounds do not converge, hold the guest paused for a growing share of each round (50 % … 99 %), as QEMU's auto-converge throttles vCPUs.")
    var autoConverge = false

    @Flag(name: .long, help: "Reconnect a post-copy migration that broke after the switch-over and finish it (QEMU's post-copy recovery).")
    var resume = false

    @Flag(name: .long, help: "Print the final report as JSON on standard output.")
    var json = false

    func validate() throws {
        do { _ = try MigrationAddress(parsing: destination) } catch { throw ValidationError("\(error)") }
        if let m = maxDowntimeMs, !(m >= 0) { throw ValidationError("--max-downtime-ms must be ≥ 0") }
        if let r = maxRounds, r < 0 { throw ValidationError("--max-rounds must be ≥ 0") }
    }

    func run() throws {
        let request = MigrateRequest(destination: destination, postcopy: postcopy, autoConverge: autoConverge,
                                     maxDowntimeMs: maxDowntimeMs, maxRounds: maxRounds, resume: resume ? true : nil)
        let terminal = isatty(2) == 1
        let final = try CtlRequests.migrate(socket: socket, request) { p in
            let message = Self.describe(p)
            if terminal { StandardError().writeRaw("\r\u{1B}[K" + message) } else { printError(message) }
        }
        if terminal { StandardError().writeRaw("\r\u{1B}[K") }
        guard let final, final.ok == true, let report = final.report else {
            let error = final?.error ?? "no answer from the VM"
            if error.contains("post-copy interrupted") || resume {
                printError("swiftvisor: migration failed: \(error)")
                printError("swiftvisor: the source keeps the pages; retry with: swiftvisor migrate --resume --socket \(socket) \(destination)")
            } else {
                printError("swiftvisor: migration failed, the VM runs on at its source: \(error)")
            }
            throw ExitCode(ToolStatus.failure)
        }
        if json {
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.sortedKeys, .prettyPrinted]
            print(String(decoding: try encoder.encode(report), as: UTF8.self))
        }
        if report.throttle > 0 { printError("auto-converge held the guest paused up to \((report.throttle * 100).fixed(0)) % of each round") }
        if let p = report.postcopy {
            printError("post-copy: \(p.remoteFaults) remote faults, median \(p.medianFaultMicroseconds.fixed(0)) µs, max \(p.maxFaultMicroseconds.fixed(0)) µs")
        }
        printError("migrated to \(report.destination) (\(report.sourceEngine) → \(report.destinationEngine)): \(report.rounds) dirty rounds, \(report.pagesSent) pages (\(report.zeroPages) zero), \((Double(report.bytesSent) / 1048576).fixed(1)) MiB sent in \(report.totalSeconds.fixed(3)) s, downtime \((report.downtimeSeconds * 1000).fixed(2)) ms, \((report.bandwidthBytesPerSecond / 1e6).fixed(0)) MB/s")
    }

    static func describe(_ p: MigrationProgress) -> String {
        "\(p.phase.rawValue) round \(p.round): \(p.pagesSent) pages sent (\((Double(p.bytesSent) / 1048576).fixed(1)) MiB), \(p.dirtyPages) dirty, \((p.bandwidthBytesPerSecond / 1e6).fixed(0)) MB/s"
    }
}

extension StandardError {
    /// Writes without a newline (a progress line redrawn in place).
    func writeRaw(_ text: String) {
        var s = StandardError()
        s.write(text)
    }
}
