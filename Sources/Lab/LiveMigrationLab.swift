import Dispatch
import FoundationEssentials
import GuestImages
import Synchronization
import VirtCore
import VMM
#if canImport(Glibc)
import Glibc
#endif

/// S9: live migration, pre-copy against post-copy, as the guest's dirty rate grows from idle
/// to beyond the link. The `migration-integrity` guest writes one byte per page across a
/// 16 MiB area, spinning between pages (the dirty rate); each rate is migrated once by
/// pre-copy and once by post-copy, between two network namespaces joined by a veth pair
/// shaped with `tbf` (or over loopback where namespaces cannot be made).
package struct LiveMigrationLab: Sendable {
    package var engine: EngineChoice
    package var memory: UInt64 = 64 << 20
    package var areaPages = 4096
    /// Guest spin loops between page writes, one row per value; nil: idle.
    package var spins: [UInt64?] = [nil, 200_000, 50_000, 10_000, 0]
    /// The link rate of the veth pair; nil: loopback, unshaped.
    package var linkMegabits: Int? = 1000
    package var maxDowntimeMilliseconds = 30.0
    package var maxRounds = 8

    package init(engine: EngineChoice) { self.engine = engine }

    package struct Run: Codable, Sendable {
        package var strategy: String
        package var totalSeconds: Double
        package var downtimeMilliseconds: Double
        package var bytesSent: UInt64
        package var rounds: Int
        package var dirtyPagesPerRound: [Int]
        package var remoteFaults: Int?
        package var medianFaultMicroseconds: Double?
        package var maxFaultMicroseconds: Double?
    }

    package struct Row: Codable, Sendable {
        package var spin: UInt64?
        /// Pages the guest dirtied per second before the migration (a lower bound when the
        /// whole area was dirtied within the measuring window).
        package var dirtyPagesPerSecond: Double
        package var dirtyRateSaturated: Bool
        /// Dirty rate over link bandwidth: pre-copy rounds shrink by this ratio.
        package var ratio: Double
        package var precopy: Run
        package var postcopy: Run
        package var modelPrecopyRounds: Int
        package var modelPrecopyDowntimeMilliseconds: Double
        package var modelConverges: Bool
    }

    package struct Result: Codable, Sendable {
        package var engine: String
        package var network: String
        package var linkBytesPerSecond: Double
        package var memoryBytes: UInt64
        package var areaPages: Int
        package var maxDowntimeMilliseconds: Double
        package var maxRounds: Int
        package var rows: [Row]
    }

    /// Two steps per spin (pre-copy, post-copy) reported to `progress`.
    package func run(progress: LabProgress = .silent) throws -> Result {
        guard areaPages >= 16, areaPages <= 4096 else { throw LabError.badParameters("the area is 16–4096 pages") }
        let link: VethLink? = try linkMegabits.map { try VethLink(megabitsPerSecond: $0) }
        defer { link?.remove() }
        var rows: [Row] = []
        var measuredBandwidth = 0.0
        progress.begin(steps: spins.count * 2)
        for spin in spins {
            progress.step("spin \(spin.map(String.init) ?? "idle"): pre-copy")
            let (pre, rate, saturated) = try migrateOnce(spin: spin, postcopy: false, link: link)
            progress.step("spin \(spin.map(String.init) ?? "idle"): post-copy")
            let (post, _, _) = try migrateOnce(spin: spin, postcopy: true, link: link)
            measuredBandwidth = max(measuredBandwidth, pre.bandwidth)
            let bandwidth = link.map { Double($0.megabitsPerSecond) * 125_000 } ?? max(measuredBandwidth, 1)
            let model = Self.precopyModel(dirtyPagesPerSecond: rate, bandwidth: bandwidth, firstPass: pre.run.dirtyPagesPerRound.first ?? 0,
                                          workingSet: areaPages, maxDowntime: maxDowntimeMilliseconds / 1000, maxRounds: maxRounds)
            rows.append(Row(spin: spin, dirtyPagesPerSecond: rate, dirtyRateSaturated: saturated,
                            ratio: rate * 4096 / bandwidth, precopy: pre.run, postcopy: post.run,
                            modelPrecopyRounds: model.rounds, modelPrecopyDowntimeMilliseconds: model.downtime * 1000,
                            modelConverges: rate * 4096 < bandwidth))
        }
        progress.finish()
        let network = link.map { "veth between network namespaces, tbf \($0.megabitsPerSecond) Mbit/s" } ?? "loopback TCP (unshaped)"
        return Result(engine: engine.rawValue, network: network,
                      linkBytesPerSecond: link.map { Double($0.megabitsPerSecond) * 125_000 } ?? measuredBandwidth,
                      memoryBytes: memory, areaPages: areaPages, maxDowntimeMilliseconds: maxDowntimeMilliseconds,
                      maxRounds: maxRounds, rows: rows)
    }

    /// Pre-copy as the textbook models it: the pages left after each round are those the
    /// guest dirtied while the round was sent, n(i) = min(W, r·n(i−1)) with r = D/B, until
    /// n·4096/B fits the downtime target or the round limit is reached.
    static func precopyModel(dirtyPagesPerSecond: Double, bandwidth: Double, firstPass: Int, workingSet: Int,
                             maxDowntime: Double, maxRounds: Int) -> (rounds: Int, downtime: Double) {
        let r = dirtyPagesPerSecond * 4096 / bandwidth
        var left = min(Double(workingSet), r * Double(max(firstPass, workingSet)))
        var rounds = 0
        while left * 4096 / bandwidth > maxDowntime && rounds < maxRounds {
            left = min(Double(workingSet), r * left)
            rounds += 1
        }
        return (rounds, left * 4096 / bandwidth)
    }

    private func runIn<R>(_ namespace: String?, _ body: () throws -> R) throws -> R {
        guard let namespace else { return try body() }
        return try NetworkNamespace.run(in: namespace, body)
    }

    /// One migration of a fresh guest: the run, the guest's dirty rate beforehand, whether it
    /// saturated the area, and the pre-copy bandwidth measured.
    private func migrateOnce(spin: UInt64?, postcopy: Bool, link: VethLink?) throws -> (run: (run: Run, bandwidth: Double), rate: Double, saturated: Bool) {
        let guest = try GuestProgram.load("migration-integrity")
        let out = GuestOutput()
        let config = MachineConfiguration(memorySize: memory,
                                          commandLine: "pages=\(areaPages) every=1000000000000 spin=\(spin ?? 1_000_000_000_000)",
                                          timeoutSeconds: 120, guestName: "migration-integrity")
        let source = try Machine(image: guest, configuration: config, engine: try EngineSelection.make(engine), serialOutput: out.append)
        let sourceThread = HostThread(name: "lab-source") { _ = try? source.run() }
        defer { source.stop(); sourceThread.join() }
        guard out.waitForLines(1) else { throw LabError.guestStalled(what: "migration-integrity", output: out.text) }
        usleep(50_000)

        // The dirty rate, from the engine's dirty log over a short window.
        let log = try source.vm.require(DirtyPageLogging.self, .dirtyLogging, neededBy: "the live-migration lab")
        source.pause()
        try log.setDirtyLogging(true)
        let t0 = monotonicNanoseconds()
        source.resume()
        usleep(20_000)
        source.pause()
        let window = Double(monotonicNanoseconds() - t0) / 1e9
        let dirty = try log.fetchDirtyLog().dirtyCount
        try log.setDirtyLogging(false)
        source.resume()

        var incomingOptions = IncomingMigrationOptions(engine: try EngineSelection.make(engine))
        incomingOptions.timeoutSeconds = 30
        let host = link?.destinationAddress ?? "127.0.0.1"
        let incoming = try runIn(link?.destination) {
            try IncomingMigration(listeningOn: .tcp(host: host, port: 0), options: incomingOptions)
        }
        defer { incoming.close() }
        let arrived = Mutex<Machine?>(nil)
        let destinationOutput = GuestOutput()
        let destinationThread = HostThread(name: "lab-destination") {
            guard let (machine, _) = try? incoming.receiveOne(serialOutput: destinationOutput.append) else { return }
            arrived.withLock { $0 = machine }
            _ = try? machine.run()  // the guest runs at once (post-copy pulls its pages meanwhile)
        }
        defer {
            arrived.withLock { $0 }?.stop()
            destinationThread.join()
        }
        let options = try MigrationOptions(maxDowntimeMilliseconds: maxDowntimeMilliseconds, maxRounds: maxRounds,
                                           timeoutSeconds: 30, postcopy: postcopy)
        let report = try runIn(link?.source) { try source.migrate(to: incoming.address, options: options) }
        _ = waitUntil { arrived.withLock { $0 } != nil }
        arrived.withLock { $0 }?.stop()
        let run = Run(strategy: postcopy ? "post-copy" : "pre-copy", totalSeconds: report.totalSeconds,
                      downtimeMilliseconds: report.downtimeSeconds * 1000, bytesSent: report.bytesSent, rounds: report.rounds,
                      dirtyPagesPerRound: report.dirtyPagesPerRound, remoteFaults: report.postcopy?.remoteFaults,
                      medianFaultMicroseconds: report.postcopy?.medianFaultMicroseconds,
                      maxFaultMicroseconds: report.postcopy?.maxFaultMicroseconds)
        return ((run, report.bandwidthBytesPerSecond), Double(dirty) / window, dirty >= areaPages)
    }

    package static func table(_ r: Result) -> LabTable {
        func ms(_ v: Double) -> String { v.fixed(1) }
        let rows = r.rows.map { row -> [String] in
            [row.spin.map(String.init) ?? "idle",
             (row.dirtyRateSaturated ? "≥" : "") + row.dirtyPagesPerSecond.fixed(0),
             row.ratio.fixed(2),
             "\(row.precopy.rounds)", (Double(row.precopy.bytesSent) / 1_048_576).fixed(1),
             ms(row.precopy.downtimeMilliseconds), ms(row.modelPrecopyDowntimeMilliseconds),
             row.precopy.totalSeconds.fixed(2),
             ms(row.postcopy.downtimeMilliseconds), "\(row.postcopy.remoteFaults ?? 0)",
             (row.postcopy.medianFaultMicroseconds ?? 0).fixed(0), row.postcopy.totalSeconds.fixed(2)]
        }
        return LabTable(
            title: "S9 live migration: \(r.engine) engine → \(r.engine), \(r.memoryBytes >> 20) MiB guest writing a \(r.areaPages)-page area, \(r.network)",
            columns: ["spin", "dirty pages/s", "D/B", "pre rounds", "pre MiB", "pre down ms", "model ms", "pre total s",
                      "post down ms", "post faults", "fault µs (median)", "post total s"],
            rows: rows,
            notes: [
                "D/B: dirty rate over link bandwidth. Pre-copy resends what was dirtied during each round, so rounds shrink by D/B and stop converging at 1; past it, the round limit (\(r.maxRounds)) forces a stop-and-copy of the whole working set and downtime grows to working set ÷ bandwidth (the model column).",
                "Post-copy stops the guest only to send the vCPU and device state and the first MiB of RAM, whatever the dirty rate; it pays instead with remote faults (a round trip each) while the guest runs at the destination.",
                "≥: the guest dirtied its whole area within the measuring window; the rate is a lower bound.",
            ])
    }

    package static func chart(_ r: Result) -> BarChart {
        BarChart(title: "S9: downtime against dirty rate (\(r.engine))",
                 categories: r.rows.map { "\(($0.dirtyPagesPerSecond).fixed(0)) p/s" },
                 series: [("pre-copy downtime (ms)", r.rows.map(\.precopy.downtimeMilliseconds)),
                          ("pre-copy model (ms)", r.rows.map(\.modelPrecopyDowntimeMilliseconds)),
                          ("post-copy downtime (ms)", r.rows.map(\.postcopy.downtimeMilliseconds))],
                 yLabel: "milliseconds", logarithmic: true)
    }
}

/// Waits (bounded) until `condition` holds.
private func waitUntil(seconds: Double = 30, _ condition: () -> Bool) -> Bool {
    let deadline = monotonicNanoseconds() + UInt64(seconds * 1e9)
    while !condition() {
        if monotonicNanoseconds() > deadline { return false }
        usleep(1000)
    }
    return true
}
