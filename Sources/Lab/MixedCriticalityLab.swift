import Devices
import Dispatch
import FoundationEssentials
#if canImport(Glibc)
import Glibc
#endif
import Synchronization
import VirtCore
import VMM
#if canImport(Glibc)
import Glibc
#endif

/// Scenario S12: a critical partition beside a best-effort one on two host CPUs.
///
/// The critical VM (`rt-critical`) runs a periodic task released by a timer interrupt;
/// each job makes one request on a shared virtual I/O queue and computes, and the guest
/// measures its response time and release jitter with the TSC. The best-effort VM
/// (`rt-besteffort`) loads the same queue, holding its lock for `holdMicroseconds` per
/// request. A medium-priority host thread runs bursts of CPU load. Pinned: the critical
/// vCPU and its timer own CPU 1 at SCHED_FIFO, the best-effort vCPU and the host load
/// share CPU 0 (load above the best-effort vCPU) — so without a priority protocol the
/// load preempts the lock holder while the critical task waits (inversion). Shared: no
/// pinning, no real-time priorities.
package struct MixedCriticalityLab: Sendable {
    package var engine: EngineChoice
    package var periodMicroseconds: UInt64 = 1000
    package var jobs = 400
    /// Loop iterations of the critical task's own work per job.
    package var work: UInt64 = 2000
    /// How long a best-effort request holds the queue's lock (µs of CPU time).
    package var holdMicroseconds: UInt64 = 300
    /// Host load: bursts of `burstMicroseconds` every `loadPeriodMicroseconds`.
    package var burstMicroseconds: UInt64 = 2000
    package var loadPeriodMicroseconds: UInt64 = 5000
    package var criticalCPU = 1, bestEffortCPU = 0
    /// SCHED_FIFO priorities when pinned. The best-effort vCPU is real-time too, at the
    /// bottom: glibc can raise only a real-time thread to a PTHREAD_PRIO_PROTECT ceiling
    /// (for a SCHED_OTHER holder the first boost fails and later ones silently do nothing).
    package var criticalPriority: Int32 = 80, timerPriority: Int32 = 90, loadPriority: Int32 = 50, bestEffortPriority: Int32 = 10

    package init(engine: EngineChoice) { self.engine = engine }

    package struct Configuration: Codable, Sendable, Hashable {
        package var pinned: Bool
        package var lockProtocol: LockProtocol
        package var load: Bool
        package var name: String {
            "\(pinned ? "pinned" : "shared"), \(lockProtocol == .plain ? "mutex" : lockProtocol == .inheritance ? "PI" : "PCP"), \(load ? "load" : "no load")"
        }
        package init(pinned: Bool, lockProtocol: LockProtocol, load: Bool) {
            self.pinned = pinned; self.lockProtocol = lockProtocol; self.load = load
        }
    }

    package static let standardConfigurations: [Configuration] = [
        Configuration(pinned: false, lockProtocol: .plain, load: false),
        Configuration(pinned: false, lockProtocol: .plain, load: true),
        Configuration(pinned: true, lockProtocol: .plain, load: false),
        Configuration(pinned: true, lockProtocol: .plain, load: true),
        Configuration(pinned: true, lockProtocol: .inheritance, load: true),
        Configuration(pinned: true, lockProtocol: .ceiling, load: true),
    ]
    package var configurations = MixedCriticalityLab.standardConfigurations

    package struct Latency: Codable, Sendable {
        package var medianMicroseconds: Double
        package var p99Microseconds: Double
        package var worstMicroseconds: Double
        /// Counts per bucket of `histogramEdgesMicroseconds`.
        package var histogram: [Int]
    }

    package struct Row: Codable, Sendable {
        package var configuration: String
        package var pinned: Bool
        package var lockProtocol: String
        package var load: Bool
        package var response: Latency
        package var jitter: Latency
        package var sharedQueueRequests: UInt64
        /// Requests refused because the lock could not be taken (should be 0).
        package var lockErrors: UInt64
        package var timerInterrupts: UInt64
    }

    package struct Result: Codable, Sendable {
        package var engine: String
        package var hostCPUs: [Int]
        package var periodMicroseconds: UInt64
        package var jobs: Int
        package var holdMicroseconds: UInt64
        package var loadBurstMicroseconds: UInt64
        package var loadPeriodMicroseconds: UInt64
        /// Upper edges of the guest's histogram buckets (the last is open).
        package var histogramEdgesMicroseconds: [Int]
        package var rows: [Row]
    }

    package static let histogramEdges = [25, 50, 100, 200, 400, 800, 1600, 3200, 6400, 12800, 25600, Int.max]

    /// One step per configuration reported to `progress` (between runs, never during one).
    package func run(progress: LabProgress = .silent) throws -> Result {
        guard engine == .kvm else {
            throw LabError.badParameters("mixed-criticality needs the kvm engine: the critical task measures time with the TSC, which the software engine counts in instructions")
        }
        guard jobs >= 10, periodMicroseconds >= 100, burstMicroseconds < loadPeriodMicroseconds else {
            throw LabError.badParameters("need at least 10 jobs, a period of at least 100 µs, and a load burst shorter than its period")
        }
        if configurations.contains(where: { !$0.pinned && $0.lockProtocol == .ceiling }) {
            throw LabError.badParameters("a priority-ceiling lock needs real-time holders: run it pinned (glibc cannot raise a SCHED_OTHER thread to the ceiling)")
        }
        if configurations.contains(where: \.pinned) {
            try Partitioning.check(PartitionPolicy(cpus: [criticalCPU, bestEffortCPU], fifoPriority: timerPriority, lockMemory: true),
                                   memoryBytes: 64 << 20)
        }
        // The pinned best-effort vCPU spins at SCHED_FIFO: past the kernel's real-time budget
        // (sched_rt_runtime_us per sched_rt_period_us) every real-time thread on its CPU is
        // throttled, which would stop the lock holder whatever the protocol. So each such
        // run stays well inside one budget, and a full period passes between them.
        let rt = Self.realtimeBandwidth()
        let seconds = Double(jobs) * Double(periodMicroseconds) / 1e6
        if configurations.contains(where: { $0.pinned && $0.load }), let runtime = rt.runtime, seconds > runtime * 0.6 {
            throw LabError.badParameters("\(jobs) jobs × \(periodMicroseconds) µs = \(seconds.fixed(2)) s is too long for the host's real-time budget (\(runtime.fixed(2)) s per \(rt.period.fixed(2)) s, /proc/sys/kernel/sched_rt_runtime_us): use fewer jobs or a shorter period")
        }
        var rows: [Row] = []
        progress.begin(steps: configurations.count)
        for (i, c) in configurations.enumerated() {
            progress.step(c.name)
            if i > 0, configurations[i - 1].pinned, configurations[i - 1].load { usleep(UInt32(rt.period * 1e6)) }
            rows.append(try run(c))
        }
        progress.finish()
        return Result(engine: engine.rawValue, hostCPUs: Partitioning.availableCPUs(), periodMicroseconds: periodMicroseconds, jobs: jobs,
                      holdMicroseconds: holdMicroseconds, loadBurstMicroseconds: burstMicroseconds,
                      loadPeriodMicroseconds: loadPeriodMicroseconds,
                      histogramEdgesMicroseconds: Self.histogramEdges.dropLast().map { $0 } + [-1], rows: rows)
    }

    func run(_ c: Configuration) throws -> Row {
        // Threads start with their creator's CPU mask and only then take their own policy.
        // Created on the critical CPU (idle between jobs), none starts where the
        // best-effort vCPU spins at SCHED_FIFO and so none waits there unscheduled.
        if c.pinned {
            let saved = Partitioning.availableCPUs()
            try Partitioning.apply(PartitionPolicy(cpus: [criticalCPU]))
            defer { try? Partitioning.apply(PartitionPolicy(cpus: saved)) }
            return try measure(c)
        }
        return try measure(c)
    }

    private func measure(_ c: Configuration) throws -> Row {
        let queue = SharedIOQueue(lock: try ProtocolMutex(c.lockProtocol, ceiling: criticalPriority))
        let tscPerMicrosecond = max(1, UInt64((1000 / HostClock.nanosecondsPerTick).rounded()))
        let critical = PartitionPolicy(cpus: [criticalCPU], fifoPriority: criticalPriority, lockMemory: true)
        let other = PartitionPolicy(cpus: [bestEffortCPU], fifoPriority: bestEffortPriority)

        var config = MachineConfiguration(memorySize: 32 << 20, commandLine:
            "count=\(jobs) tsc_per_us=\(tscPerMicrosecond) period_us=\(periodMicroseconds) work=\(work)", timeoutSeconds: 120)
        if c.pinned { config.vcpuThreadSetup = Partitioning.threadSetup(critical) }
        let output = GuestOutput()
        let machine = try Machine(image: try GuestProgram.load("rt-critical"), configuration: config,
                                  engine: try EngineSelection.make(engine), serialOutput: output.append)
        try machine.attach(queue, firstPort: SharedIOQueue.port, count: SharedIOQueue.portCount)
        if c.pinned { try Partitioning.lock(machine.memory) }
        let timer = try PeriodicTimer(machine: machine, periodNanoseconds: periodMicroseconds * 1000,
                                      policy: c.pinned ? PartitionPolicy(cpus: [criticalCPU], fifoPriority: timerPriority) : PartitionPolicy())

        var bestEffort: Machine?
        var bestEffortThread: HostThread?
        var load: HostLoad?
        if c.load {
            var beConfig = MachineConfiguration(memorySize: 32 << 20, commandLine: "hold_us=\(holdMicroseconds) spin=20000", timeoutSeconds: 120)
            if c.pinned { beConfig.vcpuThreadSetup = Partitioning.threadSetup(other) }
            let be = try Machine(image: try GuestProgram.load("rt-besteffort"), configuration: beConfig,
                                 engine: try EngineSelection.make(engine), serialOutput: { _ in })
            try be.attach(queue, firstPort: SharedIOQueue.port, count: SharedIOQueue.portCount)
            bestEffortThread = HostThread(name: "best-effort-vm") { _ = try? be.run() }
            bestEffort = be
            // The best-effort guest boots first (its CPL0 start-up is slow under nested KVM):
            // the measured jobs must all meet its load.
            let deadline = monotonicNanoseconds() + 20_000_000_000
            while queue.requests < 20 {
                guard monotonicNanoseconds() < deadline else {
                    be.stop()
                    bestEffortThread?.join()
                    throw LabError.guestStalled(what: "best-effort partition (\(c.name))", output: "")
                }
                usleep(1000)
            }
            load = HostLoad(policy: c.pinned ? PartitionPolicy(cpus: [bestEffortCPU], fifoPriority: loadPriority) : PartitionPolicy(),
                            burstMicroseconds: burstMicroseconds, periodMicroseconds: loadPeriodMicroseconds)
        }
        timer.start()
        let result = Swift.Result<RunResult, any Error> { try machine.run() }
        timer.stop()
        load?.stop()
        bestEffort?.stop()
        bestEffortThread?.join()
        let text = output.text
        let run = try result.get()
        guard run.stopReason == .exitPort(status: 0) else {
            throw LabError.guestFailed(what: "critical partition (\(c.name))", reason: run.stopReason.summary, output: text)
        }
        if let e = load?.policyError ?? timer.policyError { throw LabError.badParameters("\(c.name): \(e)") }
        return Row(configuration: c.name, pinned: c.pinned, lockProtocol: c.lockProtocol.rawValue, load: c.load,
                   response: try Self.parse("response", text), jitter: try Self.parse("jitter", text),
                   sharedQueueRequests: queue.requests, lockErrors: queue.lockErrors, timerInterrupts: timer.fired)
    }

    /// The kernel's real-time bandwidth: runtime (nil: unlimited) per period, in seconds.
    static func realtimeBandwidth() -> (runtime: Double?, period: Double) {
        func read(_ name: String) -> Double? {
            guard let text = try? String(contentsOfFile: "/proc/sys/kernel/" + name, encoding: .utf8),
                  let v = Double(text.trimmed) else { return nil }
            return v / 1e6
        }
        let period = read("sched_rt_period_us") ?? 1
        let runtime = read("sched_rt_runtime_us")
        return (runtime.flatMap { $0 < 0 ? nil : $0 }, period)
    }

    /// Reads `rt: <what>_ns median=… p99=… worst=… hist=a,b,…` from the guest's output.
    static func parse(_ what: String, _ text: String) throws -> Latency {
        guard let line = text.split(separator: "\n").first(where: { $0.hasPrefix("rt: \(what)_ns ") }) else {
            throw LabError.guestFailed(what: "critical partition", reason: "no \(what) line", output: text)
        }
        var fields: [String: String] = [:]
        for part in line.split(separator: " ") {
            let kv = part.split(separator: "=", maxSplits: 1)
            if kv.count == 2 { fields[String(kv[0])] = String(kv[1]) }
        }
        guard let median = fields["median"].flatMap(Double.init), let p99 = fields["p99"].flatMap(Double.init),
              let worst = fields["worst"].flatMap(Double.init),
              let hist = fields["hist"]?.split(separator: ",").compactMap({ Int($0) }), hist.count == histogramEdges.count else {
            throw LabError.guestFailed(what: "critical partition", reason: "unreadable \(what) line", output: text)
        }
        return Latency(medianMicroseconds: median / 1000, p99Microseconds: p99 / 1000, worstMicroseconds: worst / 1000, histogram: hist)
    }

    package static func table(_ r: Result) -> LabTable {
        let rows = r.rows.map { row in
            [row.configuration, row.response.medianMicroseconds.fixed(0), row.response.p99Microseconds.fixed(0),
             row.response.worstMicroseconds.fixed(0), row.jitter.p99Microseconds.fixed(0),
             row.jitter.worstMicroseconds.fixed(0), String(row.sharedQueueRequests), String(row.lockErrors)]
        }
        return LabTable(
            title: "S12 mixed criticality: the critical task's response time (µs) per configuration (\(r.engine) engine, task at CPL3)",
            columns: ["configuration", "median", "p99", "worst", "jitter p99", "jitter worst", "queue requests", "lock errors"],
            rows: rows,
            notes: [
                "\(r.jobs) jobs, period \(r.periodMicroseconds) µs; best-effort requests hold the shared queue's lock \(r.holdMicroseconds) µs; host load: \(r.loadBurstMicroseconds) µs bursts every \(r.loadPeriodMicroseconds) µs; host CPUs \(r.hostCPUs.map(String.init).joined(separator: ",")).",
                "pinned: critical vCPU (SCHED_FIFO 80) + timer (90) on one CPU, memory mlocked; best-effort vCPU (10) + medium-priority load (50) on the other. shared: no pinning, no real-time priorities.",
                "mutex: the load preempts the best-effort lock holder while the critical job waits (priority inversion); PI (PTHREAD_PRIO_INHERIT) boosts the holder to the waiter's priority, PCP (PTHREAD_PRIO_PROTECT) runs it at the ceiling: the wait is bounded by one hold.",
            ])
    }

    package static func chart(_ r: Result) -> BarChart {
        let labels = histogramEdges.enumerated().map { i, e in e == Int.max ? "≥\(histogramEdges[i - 1]) µs" : "<\(e) µs" }
        // Only the buckets some configuration used, so the bars stay readable.
        let used = labels.indices.filter { b in r.rows.contains { $0.response.histogram[b] > 0 } }
        let span = (used.first ?? 0)...(used.last ?? labels.count - 1)
        return BarChart(title: "S12: histogram of the critical task's response time", categories: Array(labels[span]),
                        series: r.rows.map { ($0.configuration, $0.response.histogram[span].map(Double.init)) },
                        yLabel: "jobs", logarithmic: true)
    }
}

/// The medium-priority host load: a thread that burns `burstMicroseconds` of CPU every
/// `periodMicroseconds` until stopped.
final class HostLoad: Sendable {
    private final class State: Sendable {
        let running = Atomic<Bool>(true)
        let error = Mutex<PartitionError?>(nil)
    }
    private let state = State()
    private let thread: Mutex<HostThread?>

    init(policy: PartitionPolicy, burstMicroseconds: UInt64, periodMicroseconds: UInt64) {
        let state = self.state
        thread = Mutex(HostThread(name: "host-load") {
            do throws(PartitionError) { try Partitioning.apply(policy) } catch { state.error.withLock { $0 = error } }
            var next = monotonicNanoseconds()
            while state.running.load(ordering: .acquiring) {
                let end = next + burstMicroseconds * 1000
                while monotonicNanoseconds() < end, state.running.load(ordering: .relaxed) {}
                next += periodMicroseconds * 1000
                let now = monotonicNanoseconds()
                if next > now { usleep(UInt32((next - now) / 1000)) } else { next = now }
            }
        })
    }

    var policyError: PartitionError? { state.error.withLock { $0 } }

    func stop() {
        state.running.store(false, ordering: .releasing)
        thread.withLock { $0?.join(); $0 = nil }
    }
}
