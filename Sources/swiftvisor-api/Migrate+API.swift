import ArgumentParser
import FoundationEssentials
import OperatorAPI
import SwiftvisorCLI
import VMM
import VirtCore
#if canImport(Glibc)
import Glibc
#endif

extension MigrateCommand {
    /// Runs the migration through the VM's API, printing progress and the report.
    func migrate() throws {
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
