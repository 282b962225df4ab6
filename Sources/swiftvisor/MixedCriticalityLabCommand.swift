import ArgumentParser
import Dispatch
import FoundationEssentials
#if canImport(Glibc)
import Glibc
#endif
import Lab

struct MixedCriticality: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "mixed-criticality",
        abstract: "S12: a critical partition's periodic task beside a best-effort one: pinning, and a shared queue's lock as mutex, PI or PCP.",
        discussion: """
            The 'rt-critical' guest runs a periodic task off a timer interrupt and measures its \
            response time and release jitter with the TSC; 'rt-besteffort' loads the shared \
            virtual I/O queue whose backend lock both use, and a medium-priority host thread \
            burns CPU in bursts. Configurations: shared cores vs pinned (sched_setaffinity, \
            SCHED_FIFO, mlock); plain mutex vs PTHREAD_PRIO_INHERIT vs PTHREAD_PRIO_PROTECT; \
            with and without the other partition's load. Needs KVM (the TSC must be time), and \
            for the pinned runs two host CPUs and permission for SCHED_FIFO (root or \
            CAP_SYS_NICE); the lab says which is missing.
            """)

    @OptionGroup var report: LabReportOptions

    @Option(name: .long, help: "Timer period of the critical task in µs.")
    var periodUs: UInt64 = 1000

    @Option(name: .long, help: "Jobs per configuration.")
    var jobs = 400

    @Option(name: .long, help: "How long a best-effort request holds the queue's lock (µs).")
    var holdUs: UInt64 = 300

    @Option(name: .long, help: "Host load burst length (µs).")
    var burstUs: UInt64 = 2000

    @Option(name: .long, help: "Host load period (µs).")
    var loadPeriodUs: UInt64 = 5000

    func validate() throws {
        guard jobs >= 10, jobs <= 4096 else { throw ValidationError("--jobs: 10–4096") }
        guard periodUs >= 100 else { throw ValidationError("--period-us: at least 100") }
        guard burstUs < loadPeriodUs else { throw ValidationError("--burst-us must be shorter than --load-period-us") }
    }

    func run() throws {
        var lab = MixedCriticalityLab(engine: .kvm)
        lab.periodMicroseconds = periodUs
        lab.jobs = jobs
        lab.holdMicroseconds = holdUs
        lab.burstMicroseconds = burstUs
        lab.loadPeriodMicroseconds = loadPeriodUs
        printError("lab mixed-criticality: \(lab.configurations.count) configurations × \(jobs) jobs…")
        let result = try lab.run(progress: .onTerminal("lab mixed-criticality", report: report))
        try report.emit(result, name: "mixed-criticality", table: MixedCriticalityLab.table(result), chart: MixedCriticalityLab.chart(result))
    }
}
