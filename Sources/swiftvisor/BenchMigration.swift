import ArgumentParser
import Lab
import VMM
import VirtCore
#if canImport(Glibc)
import Glibc
#endif

struct BenchMigration: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "migration",
        abstract: "Live-migration and snapshot stream rates, pre-copy downtime and post-copy fault latency, beside the targets.",
        discussion: """
            stream: all of a RAM (--memory, default 1G) filled with non-repeating data goes as migration page frames between two threads, over loopback TCP and over a Unix socket; the receiver places the pages in a second RAM, which must then equal the first. The target rows stream into a destination RAM allocated beforehand (as 'run --incoming --prealloc' does while it waits); one more row streams into fresh RAM, where every page also costs the host a page allocation — its rate, measured beside, bounds that row.

            snapshot: the same RAM written as a snapshot file into --snapshot-dir (a tmpfs by default), fsync and rename included.

            With a guest (unless --no-guest), on --engine: a running guest's snapshot, an idle 256 MiB guest migrated by pre-copy over loopback TCP (total time, downtime), and the migration-integrity guest sweeping its pages without pause during post-copy, so that it runs ahead of the background push and faults (median remote-fault latency).
            """)

    @Option(name: .long, help: "RAM moved by the stream and snapshot rows (K, M, G suffixes).")
    var memory = MemoryArgument(argument: "1G")!

    @Option(name: .long, help: ArgumentHelp("Directory for the snapshot row's file.", valueName: "dir"))
    var snapshotDir = "/dev/shm"

    @Option(name: .long, help: ArgumentHelp("Engine of the guest rows: kvm or software (default: kvm when usable).", valueName: "engine"))
    var engine: EngineChoice?

    @Flag(name: .long, help: "Only the stream and snapshot rows.")
    var noGuest = false

    @Option(name: .long, help: ArgumentHelp("Also write results as JSON to this file.", valueName: "path"))
    var json: String?

    struct Row: Codable {
        var measurement: String
        var value: Double
        var unit: String
        var target: String
        var met: Bool
        var detail: String
    }

    func run() throws {
        var rows: [Row] = []
        func gbps(_ m: StreamBenchmark.Measurement) -> Double { m.bytesPerSecond / 1e9 }
        do {
            for (address, label, prealloc) in [(MigrationAddress.tcp(host: "127.0.0.1", port: 0), "TCP loopback", true),
                                               (.unix(path: HostPaths.temporaryDirectory + "swiftvisor-bench-\(getpid()).sock"), "Unix socket", true),
                                               (.tcp(host: "127.0.0.1", port: 0), "TCP loopback, into fresh RAM", false)] {
                printError("bench: filling and streaming \(memory.bytes >> 20) MiB over \(label)\(prealloc ? " (preallocated destination)" : "")")
                let m = try StreamBenchmark.migrationStream(bytes: memory.bytes, over: address, preallocatedDestination: prealloc)
                var detail = "\(m.bytes >> 20) MiB in \((m.seconds * 1000).fixed(0)) ms, CPU \((m.cpuSeconds * 1000).fixed(0)) ms"
                if let allocation = m.destinationAllocationSeconds {
                    detail += "; host page allocation \((Double(m.bytes) / allocation / 1e9).fixed(2)) GB/s"
                }
                let isTarget = prealloc && label == "TCP loopback"
                rows.append(Row(measurement: "migration stream, \(label)", value: gbps(m), unit: "GB/s", target: isTarget ? "≥ 2 GB/s" : "—",
                                met: !isTarget || gbps(m) >= 2, detail: detail))
            }
            printError("bench: writing a snapshot into \(snapshotDir)")
            let snap = try StreamBenchmark.snapshotWrite(bytes: memory.bytes, directory: snapshotDir)
            let perGiB = snap.seconds * Double(1 << 30) / Double(memory.bytes)
            rows.append(Row(measurement: "snapshot file, \(snapshotDir)", value: perGiB, unit: "s per GiB", target: "≤ 1 s",
                            met: perGiB <= 1, detail: "\(snap.bytes >> 20) MiB in \((snap.seconds * 1000).fixed(0)) ms, CPU \((snap.cpuSeconds * 1000).fixed(0)) ms"))
            if !noGuest {
                let chosen = engine ?? EngineChoice(rawValue: EngineSelection.makeDefault { printError("swiftvisor: " + $0) }.name) ?? .software
                printError("bench: snapshot of a running \(memory.bytes >> 20) MiB \(chosen.rawValue) guest into \(snapshotDir)")
                let (machineSnap, pause) = try StreamBenchmark.machineSnapshot(bytes: memory.bytes, engine: try EngineSelection.make(chosen),
                                                                              directory: snapshotDir)
                let machinePerGiB = machineSnap.seconds * Double(1 << 30) / Double(memory.bytes)
                rows.append(Row(measurement: "running guest's snapshot, \(snapshotDir) (\(chosen.rawValue))", value: machinePerGiB,
                                unit: "s per GiB", target: "≤ 1 s", met: machinePerGiB <= 1,
                                detail: "\(machineSnap.bytes >> 20) MiB file in \((machineSnap.seconds * 1000).fixed(0)) ms, paused \((pause * 1000).fixed(1)) ms, CPU \((machineSnap.cpuSeconds * 1000).fixed(0)) ms"))
                var lab = LiveMigrationLab(engine: chosen)
                lab.memory = 256 << 20
                lab.linkMegabits = nil
                lab.spins = [nil, 0]
                lab.maxDowntimeMilliseconds = 10
                let result = try lab.run(progress: LabProgress("bench: \(chosen.rawValue) guest") { line in line.map { printError($0) } })
                let idle = result.rows[0].precopy
                rows.append(Row(measurement: "idle 256 MiB pre-copy: downtime (\(result.engine))", value: idle.downtimeMilliseconds,
                                unit: "ms", target: "≤ 10 ms", met: idle.downtimeMilliseconds <= 10,
                                detail: "\(idle.rounds) rounds, \((Double(idle.bytesSent) / 1_048_576).fixed(1)) MiB sent"))
                rows.append(Row(measurement: "idle 256 MiB pre-copy: total (\(result.engine))", value: idle.totalSeconds * 1000,
                                unit: "ms", target: "≤ 500 ms", met: idle.totalSeconds <= 0.5, detail: ""))
                let post = result.rows[1].postcopy
                let median = post.medianFaultMicroseconds ?? 0
                rows.append(Row(measurement: "post-copy remote fault, median (\(result.engine))", value: median, unit: "µs",
                                target: "≤ 100 µs", met: median <= 100 && (post.remoteFaults ?? 0) > 0,
                                detail: "\(post.remoteFaults ?? 0) faults, max \((post.maxFaultMicroseconds ?? 0).fixed(0)) µs"))
            }
        } catch {
            printError("swiftvisor: error: \(error)")
            throw ExitCode(ToolStatus.failure)
        }
        let table = LabTable(title: "Migration and snapshot streams (release build; \(StreamBenchmark.checksumInHardware ? "SSE4.2 crc32" : "table CRC-32C"))",
                             columns: ["measurement", "value", "unit", "target", "met", "detail"],
                             rows: rows.map { [$0.measurement, $0.value.significant(3), $0.unit, $0.target, $0.met ? "yes" : "NO", $0.detail] })
        print(table.text)
        if let path = json {
            struct Output: Encodable { var benchmark = "migration"; var memoryBytes: UInt64; var results: [Row] }
            try writeJSON(path, Output(memoryBytes: memory.bytes, results: rows))
        }
    }
}
