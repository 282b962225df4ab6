import Synchronization
import VirtCore

/// The vCPUs' exit statistics while they run (for metrics scraped during a run): each run
/// loop publishes a copy of its own counters about every 10 ms and when it ends, so the
/// loop itself takes no lock per exit. Times are kept in TSC ticks, as the loops record them.
public final class LiveExitStatistics: Sendable {
    private let perVCPU = Mutex<[Int: ExitStatistics]>([:])
    /// How often (in TSC ticks) a run loop publishes: about every 10 ms.
    package let publishIntervalTicks: UInt64 = UInt64(10e6 / LiveExitStatistics.approximateNanosecondsPerTick)

    /// The TSC rate estimated over 50 µs (a relative error of ~1e-3; preemption in between does
    /// not skew it, both clocks run on): enough for "about every 10 ms", without the 2 ms spin
    /// of `HostClock.nanosecondsPerTick` before every machine's first instruction.
    private static let approximateNanosecondsPerTick: Double = {
        let n0 = monotonicNanoseconds(), t0 = HostClock.ticks()
        while monotonicNanoseconds() - n0 < 50_000 {}
        let n1 = monotonicNanoseconds(), t1 = HostClock.ticks()
        return t1 > t0 ? Double(n1 - n0) / Double(t1 - t0) : 1
    }()

    package init() {}

    package func publish(vcpu: Int, _ statistics: ExitStatistics) {
        perVCPU.withLock { $0[vcpu] = statistics }
    }

    /// All vCPUs' counters merged, times in nanoseconds.
    public var merged: ExitStatistics {
        var all = ExitStatistics()
        for s in perVCPU.withLock({ Array($0.values) }) { all.merge(s) }
        all.scaleTimes(by: HostClock.nanosecondsPerTick)
        return all
    }
}
