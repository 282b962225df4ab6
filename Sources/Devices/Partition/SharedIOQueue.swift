import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// How a lock treats the priorities of the threads that use it.
public enum LockProtocol: String, CaseIterable, Sendable, Codable, CustomStringConvertible {
    /// PTHREAD_PRIO_NONE: the holder keeps its own priority.
    case plain
    /// PTHREAD_PRIO_INHERIT: the holder runs at the priority of its highest waiter.
    case inheritance
    /// PTHREAD_PRIO_PROTECT: the holder runs at the lock's ceiling while it holds it.
    case ceiling
    public var description: String { rawValue }
}

public enum ProtocolMutexError: Error, Equatable, Sendable, CustomStringConvertible {
    case attribute(String, errno: Int32)
    case initialisation(errno: Int32)

    public var description: String {
        switch self {
        case let .attribute(what, e): return "cannot set the mutex's \(what): \(String(cString: strerror(e)))"
        case let .initialisation(e): return "cannot create the mutex: \(String(cString: strerror(e)))"
        }
    }
}

/// A pthread mutex with a priority protocol. Swift's `Mutex` has no protocol attribute,
/// and the protocol is the point here.
// SAFETY: the pthread mutex is itself the synchronisation; its storage never moves.
public final class ProtocolMutex: @unchecked Sendable {
    private let mutex: UnsafeMutablePointer<pthread_mutex_t>
    public let lockProtocol: LockProtocol
    public let ceiling: Int32

    /// - Parameter ceiling: the SCHED_FIFO priority a `.ceiling` holder runs at (the
    ///   highest priority of any thread that takes the lock).
    public init(_ lockProtocol: LockProtocol, ceiling: Int32 = 0) throws(ProtocolMutexError) {
        self.lockProtocol = lockProtocol
        self.ceiling = ceiling
        var attr = pthread_mutexattr_t()
        pthread_mutexattr_init(&attr)
        defer { pthread_mutexattr_destroy(&attr) }
        let p: Int32
        switch lockProtocol {
        case .plain: p = Int32(PTHREAD_PRIO_NONE)
        case .inheritance: p = Int32(PTHREAD_PRIO_INHERIT)
        case .ceiling: p = Int32(PTHREAD_PRIO_PROTECT)
        }
        var rc = pthread_mutexattr_setprotocol(&attr, p)
        guard rc == 0 else { throw .attribute("protocol \(lockProtocol)", errno: rc) }
        if lockProtocol == .ceiling {
            rc = pthread_mutexattr_setprioceiling(&attr, ceiling)
            guard rc == 0 else { throw .attribute("priority ceiling \(ceiling)", errno: rc) }
        }
        mutex = .allocate(capacity: 1)
        rc = pthread_mutex_init(mutex, &attr)
        guard rc == 0 else {
            mutex.deallocate()
            throw .initialisation(errno: rc)
        }
    }

    deinit {
        pthread_mutex_destroy(mutex)
        mutex.deallocate()
    }

    /// 0, or the error pthread_mutex_lock gave (EINVAL: the caller's priority is above a
    /// ceiling lock's ceiling).
    public func lock() -> Int32 { pthread_mutex_lock(mutex) }
    public func unlock() { pthread_mutex_unlock(mutex) }
}

/// The shared virtual I/O queue of scenario S12: one backend both partitions' devices
/// use, serialised by one lock (as a VMM's device backends often share one). A request
/// (`out` of its work in µs to `port`) is served on the requesting vCPU's thread, holding
/// the lock for that much CPU time.
public final class SharedIOQueue: PortIODevice, Sendable {
    public static let port: UInt16 = 0x520
    public static let portCount = 4
    /// Longest request served, in µs (a hostile guest cannot hold the lock longer).
    public static let maxWorkMicroseconds: UInt32 = 10_000

    public var name: String { "shared-io-queue" }
    public let lock: ProtocolMutex
    private let counts = Mutex((requests: UInt64(0), lockErrors: UInt64(0)))

    public init(lock: ProtocolMutex) { self.lock = lock }

    public var requests: UInt64 { counts.withLock { $0.requests } }
    /// Requests refused because the lock would not be taken (a ceiling below the caller).
    public var lockErrors: UInt64 { counts.withLock { $0.lockErrors } }

    public func portRead(offset: UInt16, size: UInt8) -> UInt32 { UInt32(truncatingIfNeeded: requests) }

    public func portWrite(offset: UInt16, size: UInt8, value: UInt32) {
        guard offset == 0 else { return }
        guard lock.lock() == 0 else {
            counts.withLock { $0.lockErrors += 1 }
            return
        }
        Self.spinThreadTime(microseconds: min(value, Self.maxWorkMicroseconds))
        counts.withLock { $0.requests += 1 }
        lock.unlock()
    }

    /// The backend's work: `microseconds` of this thread's CPU time (not wall time, so a
    /// preempted holder still owes its whole request).
    static func spinThreadTime(microseconds: UInt32) {
        var start = timespec()
        clock_gettime(CLOCK_THREAD_CPUTIME_ID, &start)
        let target = Int64(microseconds) * 1000
        var now = timespec()
        repeat {
            clock_gettime(CLOCK_THREAD_CPUTIME_ID, &now)
        } while Int64(now.tv_sec - start.tv_sec) * 1_000_000_000 + Int64(now.tv_nsec - start.tv_nsec) < target
    }
}
