import Devices
import Synchronization
import VirtCore
#if canImport(Glibc)
import Glibc
#endif

/// A periodic timer interrupt for a partition (S12): a host thread, itself partitioned
/// (pinned next to the critical vCPU, above it in priority, as a hardware timer would
/// be), raises the machine's irq every `periodNanoseconds` of CLOCK_MONOTONIC, on
/// absolute deadlines so the period does not drift.
public final class PeriodicTimer: Sendable {
    /// The timer's irq: the last line, clear of the MMIO slots' lines 1, 2, 3 …
    public static let irq: UInt8 = 15

    public let periodNanoseconds: UInt64
    private let line: InterruptLine
    private let policy: PartitionPolicy
    private final class Flag: Sendable {
        let value = Atomic<Bool>(false)
        let fired = Atomic<UInt64>(0)
        let setupError = Mutex<PartitionError?>(nil)
    }
    private let flag = Flag()
    private let thread = Mutex<HostThread?>(nil)

    /// Lists the timer in `machine`'s boot info. Call before the machine runs.
    public init(machine: Machine, periodNanoseconds: UInt64, policy: PartitionPolicy = PartitionPolicy()) throws {
        precondition(periodNanoseconds >= 10_000, "a period of at least 10 µs")
        self.periodNanoseconds = periodNanoseconds
        self.policy = policy
        line = machine.interruptLine(irq: Self.irq)
        try machine.listDevice(type: .periodicTimer, base: 0, size: 0, irq: Self.irq)
    }

    /// Interrupts raised so far.
    public var fired: UInt64 { flag.fired.load(ordering: .relaxed) }
    /// Set when the timer thread could not take its policy (it then runs without it).
    public var policyError: PartitionError? { flag.setupError.withLock { $0 } }

    public func start() {
        guard !flag.value.exchange(true, ordering: .acquiringAndReleasing) else { return }
        let (flag, line, period, policy) = (self.flag, self.line, self.periodNanoseconds, self.policy)
        thread.withLock { $0 = HostThread(name: "partition-timer") {
            do throws(PartitionError) { try Partitioning.apply(policy) } catch { flag.setupError.withLock { $0 = error } }
            var next = timespec()
            clock_gettime(CLOCK_MONOTONIC, &next)
            while flag.value.load(ordering: .acquiring) {
                let ns = Int(next.tv_nsec) + Int(period)
                next.tv_sec += ns / 1_000_000_000
                next.tv_nsec = ns % 1_000_000_000
                while clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &next, nil) == EINTR {}
                line(true)
                line(false)
                flag.fired.add(1, ordering: .relaxed)
            }
        } }
    }

    public func stop() {
        guard flag.value.exchange(false, ordering: .acquiringAndReleasing) else { return }
        thread.withLock { $0?.join(); $0 = nil }
    }

    deinit { stop() }
}
