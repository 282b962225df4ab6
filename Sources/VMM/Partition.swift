import CHost
import VirtCore
#if canImport(Glibc)
import Glibc
#endif

/// Where and how a partition's host threads run (scenario S12): pinned to given host
/// CPUs, at a SCHED_FIFO priority, with the VM's memory locked.
public struct PartitionPolicy: Sendable, Equatable, Codable {
    /// Host CPUs the threads may run on (empty: any).
    public var cpus: [Int] = []
    /// SCHED_FIFO priority (nil: the normal time-sharing scheduler).
    public var fifoPriority: Int32?
    /// Pre-fault and mlock the VM's RAM so no page fault delays the partition.
    public var lockMemory = false

    public init(cpus: [Int] = [], fifoPriority: Int32? = nil, lockMemory: Bool = false) {
        self.cpus = cpus; self.fifoPriority = fifoPriority; self.lockMemory = lockMemory
    }
}

/// Why the host refused a partition setting.
public enum PartitionError: Error, Equatable, Sendable, CustomStringConvertible {
    case cpuUnavailable(cpu: Int, available: [Int])
    case affinityRefused(errno: Int32)
    case priorityOutOfRange(Int32, range: ClosedRange<Int32>)
    case realtimeRefused(priority: Int32, errno: Int32)
    case memoryLockRefused(bytes: UInt64, limit: UInt64?, errno: Int32)

    public var description: String {
        switch self {
        case let .cpuUnavailable(cpu, available):
            return "host CPU \(cpu) is not available to this process (it may use \(available.map(String.init).joined(separator: ", ")))"
        case let .affinityRefused(e):
            return "cannot pin the thread (sched_setaffinity): \(String(cString: strerror(e)))"
        case let .priorityOutOfRange(p, range):
            return "SCHED_FIFO priority \(p) is outside \(range.lowerBound)–\(range.upperBound)"
        case let .realtimeRefused(p, e):
            return "SCHED_FIFO priority \(p) refused: \(String(cString: strerror(e)))" + (e == EPERM ? " (needs root or CAP_SYS_NICE, or RLIMIT_RTPRIO ≥ \(p))" : "")
        case let .memoryLockRefused(bytes, limit, e):
            return "cannot lock \(MemorySize.format(bytes)) of guest RAM: \(String(cString: strerror(e)))"
                + (limit.map { " (RLIMIT_MEMLOCK is \(MemorySize.format($0)))" } ?? "")
        }
    }
}

public enum Partitioning {
    /// The host CPUs this process may use.
    public static func availableCPUs() -> [Int] {
        var cpus = [Int32](repeating: 0, count: 1024)
        let n = host_get_affinity(&cpus, Int32(cpus.count))
        return n > 0 ? cpus.prefix(Int(n)).map(Int.init) : []
    }

    /// RLIMIT_MEMLOCK in bytes, nil when unlimited.
    static func memoryLockLimit() -> UInt64? {
        let limit = host_memlock_limit()
        return limit < 0 ? nil : UInt64(limit)
    }

    /// Checks what the host allows without changing anything: the CPUs exist and are
    /// ours, the priority is in range, and (by asking on a probe thread) SCHED_FIFO is
    /// permitted; memory locking within RLIMIT_MEMLOCK unless root.
    public static func check(_ policy: PartitionPolicy, memoryBytes: UInt64 = 0) throws(PartitionError) {
        let available = availableCPUs()
        for cpu in policy.cpus where !available.contains(cpu) { throw .cpuUnavailable(cpu: cpu, available: available) }
        if let p = policy.fifoPriority {
            let range = sched_get_priority_min(SCHED_FIFO)...sched_get_priority_max(SCHED_FIFO)
            guard range.contains(p) else { throw .priorityOutOfRange(p, range: range) }
            let rc = probeRealtime(priority: p)
            guard rc == 0 else { throw .realtimeRefused(priority: p, errno: rc) }
        }
        if policy.lockMemory, geteuid() != 0, let limit = memoryLockLimit(), limit < memoryBytes {
            throw .memoryLockRefused(bytes: memoryBytes, limit: limit, errno: ENOMEM)
        }
    }

    /// Tries SCHED_FIFO at `priority` on a short-lived thread; 0 or the error.
    private static func probeRealtime(priority: Int32) -> Int32 {
        final class Result: @unchecked Sendable { var rc: Int32 = 0 }  // SAFETY: written before join, read after
        let result = Result()
        let thread = HostThread(name: "rt-probe") {
            var param = sched_param()
            param.sched_priority = priority
            result.rc = pthread_setschedparam(pthread_self(), SCHED_FIFO, &param)
        }
        thread.join()
        return result.rc
    }

    /// Applies `policy` to the calling thread: the priority first, so a thread moving onto
    /// a CPU where a real-time thread spins is not left there unscheduled.
    public static func apply(_ policy: PartitionPolicy) throws(PartitionError) {
        if let p = policy.fifoPriority {
            var param = sched_param()
            param.sched_priority = p
            let rc = pthread_setschedparam(pthread_self(), SCHED_FIFO, &param)
            guard rc == 0 else { throw .realtimeRefused(priority: p, errno: rc) }
        }
        if !policy.cpus.isEmpty {
            let cpus = policy.cpus.map { Int32(clamping: $0) }
            let rc = host_set_thread_affinity(cpus, Int32(cpus.count))
            guard rc == 0 else { throw .affinityRefused(errno: -rc) }
        }
    }

    /// Pre-faults and locks `memory` (all of guest RAM) into host RAM.
    public static func lock(_ memory: GuestMemory) throws(PartitionError) {
        guard let base = memory.hostPointer(0, length: Int(memory.size)) else { return }
        guard mlock(base, Int(memory.size)) == 0 else {
            throw .memoryLockRefused(bytes: memory.size, limit: memoryLockLimit(), errno: errno)
        }
    }

    /// A per-vCPU thread setup for `MachineConfiguration.vcpuThreadSetup`.
    public static func threadSetup(_ policy: PartitionPolicy) -> @Sendable (Int) throws -> Void {
        { _ in try apply(policy) }
    }
}
