import Synchronization
import VirtCore

/// The vCPUs' exit statistics while they run (for metrics scraped during a run): each run
/// loop publishes a copy of its own counters about every 10 ms and when it ends, so the
/// loop itself takes no lock per exit. Times are kept in TSC ticks, as the loops record them.
public final class LiveExitStatistics: Sendable {
    private let perVCPU = Mutex<[Int: ExitStatistics]>([:])
    /// How often (in TSC ticks) a run loop publishes.
    package let publishIntervalTicks: UInt64 = UInt64(10e6 / HostClock.nanosecondsPerTick)

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
