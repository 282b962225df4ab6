import Dispatch
import FoundationEssentials
#if canImport(Glibc)
import Glibc
#endif
import GuestImages
import VirtCore
import VMM

/// Scenario S6: copy-on-write snapshots of a running guest. The `counter` guest prints a
/// line per step and writes `touch` pages per step — 8 bytes each (small writes) or whole
/// pages (large writes); a snapshot is taken while it runs, then restored eagerly and lazily.
package struct CowSnapshotLab: Sendable {
    package var engine: EngineChoice
    package var memory: UInt64 = 64 << 20
    package var touch: UInt64 = 256
    package var directory = HostPaths.temporaryDirectory

    package init(engine: EngineChoice) { self.engine = engine }

    package struct Row: Codable, Sendable {
        package var workload: String
        package var pauseMilliseconds: Double
        package var totalMilliseconds: Double
        package var cowFaults: UInt64
        package var bytesCopied: UInt64
        /// Bytes the guest wrote while the snapshot was being written (all writes).
        package var bytesWrittenByGuest: UInt64
        /// Bytes the guest's faulting writes changed: one page-write (8 B or 4 KiB) per page a
        /// fault copied (a fault racing the writer on a page it had just saved copies nothing).
        package var bytesWrittenToProtectedPages: UInt64
        /// Bytes copied per byte the guest changed in protected pages.
        package var writeAmplification: Double?
        package var fileBytes: UInt64
        package var mechanism: String
        /// Restore: from opening the file to the vCPU's first instruction (the VM built and
        /// RAM read, or armed for lazy loading), and to the guest's next output line.
        package var eagerRestoreToFirstInstructionMs: Double
        package var eagerRestoreToOutputMs: Double
        package var lazyRestoreToFirstInstructionMs: Double
        package var lazyRestoreToOutputMs: Double
        package var lazyPagesFaultedIn: UInt64
    }

    package struct Result: Codable, Sendable {
        package var engine: String
        package var memoryBytes: UInt64
        package var pagesTouchedPerStep: UInt64
        package var rows: [Row]
    }

    /// One step per write size reported to `progress`.
    package func run(progress: LabProgress = .silent) throws -> Result {
        var rows: [Row] = []
        progress.begin(steps: 2)
        for fill in [false, true] {
            progress.step(fill ? "large writes" : "small writes")
            rows.append(try measure(fill: fill))
        }
        progress.finish()
        return Result(engine: engine.rawValue, memoryBytes: memory, pagesTouchedPerStep: touch, rows: rows)
    }

    func measure(fill: Bool) throws -> Row {
        let path = directory + "/swiftvisor-lab-\(getpid())-\(engine.rawValue)-\(fill ? "large" : "small").snap"
        ProcessLifecycle.register(path: path)  // removed if a signal ends the lab
        defer { unlink(path); ProcessLifecycle.unregister(path: path) }
        let out = GuestOutput()
        let work = engine == .kvm ? 200_000 : 20_000
        var config = MachineConfiguration(memorySize: memory, commandLine: "work=\(work) touch=\(touch) fill=\(fill ? 1 : 0)",
                                          timeoutSeconds: 600)
        config.recordExits = false
        config.guestName = "counter"
        let m = try Machine(image: try GuestProgram.load("counter"), configuration: config,
                            engine: try EngineSelection.make(engine), serialOutput: out.append)
        let runner = HostThread(name: "lab-counter") { _ = try? m.run() }
        defer { m.stop(); runner.join() }
        guard out.waitForLines(20) else { throw LabError.guestStalled(what: "the counter guest", output: out.text) }
        var linesAtSnapshot = 0
        let report = try m.snapshot(to: path, whilePaused: { linesAtSnapshot = out.lines })
        let linesDuring = max(out.lines - linesAtSnapshot, 0)
        m.stop()
        let written = UInt64(linesDuring) * touch * (fill ? 4096 : 8)
        let intoProtected = report.bytesCopied / 4096 * (fill ? 4096 : 8)

        func restore(lazy: Bool) throws -> (Double, Double, UInt64) {
            let clock = GuestOutput()
            let t0 = monotonicNanoseconds()
            let clone = try Machine(restoring: try SnapshotFile(path: path), engine: try EngineSelection.make(engine), lazy: lazy,
                                    timeoutSeconds: 600, serialOutput: clock.append)
            let t1 = monotonicNanoseconds()
            let runner = HostThread(name: "lab-clone") { _ = try? clone.run() }
            defer { clone.stop(); runner.join() }
            _ = clock.waitForLines(1)
            let t2 = clock.firstLineAt ?? monotonicNanoseconds()
            return (Double(t1 - t0) / 1e6, Double(t2 - t0) / 1e6, clone.lazyRestoreFaults)
        }
        let eager = try restore(lazy: false)
        let lazy = try restore(lazy: true)
        return Row(workload: fill ? "large writes (whole pages)" : "small writes (8 B/page)",
                   pauseMilliseconds: report.pauseSeconds * 1000, totalMilliseconds: report.totalSeconds * 1000,
                   cowFaults: report.copyOnWriteFaults, bytesCopied: report.bytesCopied, bytesWrittenByGuest: written,
                   bytesWrittenToProtectedPages: intoProtected,
                   writeAmplification: intoProtected > 0 ? Double(report.bytesCopied) / Double(intoProtected) : nil,
                   fileBytes: report.fileBytes, mechanism: report.mechanism,
                   eagerRestoreToFirstInstructionMs: eager.0, eagerRestoreToOutputMs: eager.1,
                   lazyRestoreToFirstInstructionMs: lazy.0, lazyRestoreToOutputMs: lazy.1, lazyPagesFaultedIn: lazy.2)
    }

    package static func table(_ r: Result) -> LabTable {
        let rows = r.rows.map { x in
            [x.workload, x.pauseMilliseconds.fixed(2), x.totalMilliseconds.fixed(1), String(x.cowFaults),
             (Double(x.bytesCopied) / 1024).fixed(1), (Double(x.bytesWrittenByGuest) / 1024).fixed(1),
             (Double(x.bytesWrittenToProtectedPages) / 1024).fixed(1),
             x.writeAmplification.map { "\($0.fixed(1))×" } ?? "-",
             "\(x.eagerRestoreToFirstInstructionMs.fixed(1)) / \(x.eagerRestoreToOutputMs.fixed(1))",
             "\(x.lazyRestoreToFirstInstructionMs.fixed(1)) / \(x.lazyRestoreToOutputMs.fixed(1))"]
        }
        let mechanism = r.rows.first?.mechanism ?? ""
        return LabTable(
            title: "S6 copy-on-write snapshot of a running guest (\(r.engine) engine, \(MemorySize.format(r.memoryBytes)) RAM, \(r.pagesTouchedPerStep) pages written per step, guest at CPL3)",
            columns: ["workload", "pause ms", "total ms", "COW faults", "KiB copied", "KiB written (all)", "KiB into protected", "amplification", "eager restore ms (1st instr / 1st line)", "lazy restore ms"],
            rows: rows,
            notes: ["writes are caught by \(mechanism); the guest is stopped only for \"pause\" (vCPU state saved, protection armed) and runs during \"total\".",
                    "a COW fault copies a whole 4 KiB page however little the guest wrote: small writes amplify 512× (4 KiB copied per 8 B changed), whole-page writes 1×. Most writes hit pages already saved and cost nothing: \"KiB written (all)\" is everything the guest wrote while the snapshot was written.",
                    "lazy restore starts the guest before RAM is read (pages come in on first touch, each 64 KiB chunk verified); eager restore reads and verifies all of RAM first."])
    }

    package static func chart(_ r: Result) -> BarChart {
        BarChart(title: "S6 on the \(r.engine) engine", categories: r.rows.map(\.workload),
                 series: [("KiB copied", r.rows.map { Double($0.bytesCopied) / 1024 }),
                          ("KiB written by guest", r.rows.map { Double($0.bytesWrittenByGuest) / 1024 }),
                          ("eager restore to 1st line (ms)", r.rows.map(\.eagerRestoreToOutputMs)),
                          ("lazy restore to 1st line (ms)", r.rows.map(\.lazyRestoreToOutputMs))],
                 yLabel: "value", logarithmic: true)
    }
}
