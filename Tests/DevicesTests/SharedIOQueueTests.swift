import Testing
@testable import Devices
#if canImport(Glibc)
import Glibc
#endif

/// Whether this process may use SCHED_FIFO (root or CAP_SYS_NICE): probed on a thread.
func realtimePermitted() -> Bool {
    var thread = pthread_t()
    var ok = false
    withUnsafeMutablePointer(to: &ok) { okPointer in
        _ = pthread_create(&thread, nil, { arg in
            var param = sched_param()
            param.sched_priority = 10
            arg!.assumingMemoryBound(to: Bool.self).pointee = pthread_setschedparam(pthread_self(), SCHED_FIFO, &param) == 0
            return nil
        }, okPointer)
        pthread_join(thread, nil)
    }
    return ok
}

@Suite struct SharedIOQueueTests {
    @Test(arguments: [LockProtocol.plain, .inheritance])
    func requestsAreServedUnderTheLockForTheirCPUTime(_ lockProtocol: LockProtocol) throws {
        let queue = SharedIOQueue(lock: try ProtocolMutex(lockProtocol))
        var before = timespec(), after = timespec()
        clock_gettime(CLOCK_THREAD_CPUTIME_ID, &before)
        queue.portWrite(offset: 0, size: 4, value: 2000)
        clock_gettime(CLOCK_THREAD_CPUTIME_ID, &after)
        let spent = Int64(after.tv_sec - before.tv_sec) * 1_000_000_000 + Int64(after.tv_nsec - before.tv_nsec)
        #expect(queue.requests == 1 && queue.lockErrors == 0)
        #expect(spent >= 2_000_000)
        #expect(queue.portRead(offset: 0, size: 4) == 1)
        queue.portWrite(offset: 4, size: 4, value: 5)  // not the request register: ignored
        #expect(queue.requests == 1)
    }

    /// glibc raises a ceiling lock's holder with sched_setscheduler in the holder's own
    /// policy, which fails for SCHED_OTHER: such a caller's request is refused and counted.
    @Test func aCeilingLockServesRealtimeCallersAndRefusesOthers() throws {
        let queue = SharedIOQueue(lock: try ProtocolMutex(.ceiling, ceiling: 30))
        queue.portWrite(offset: 0, size: 4, value: 1)
        #expect(queue.requests == 0 && queue.lockErrors == 1)
        guard realtimePermitted() else {
            print("skipped the real-time half: SCHED_FIFO is not permitted here (needs root or CAP_SYS_NICE)")
            return
        }
        onRealtimeThread(priority: 20) { queue.portWrite(offset: 0, size: 4, value: 1) }
        #expect(queue.requests == 1 && queue.lockErrors == 1)
    }

    @Test func aHostileRequestCannotHoldTheLockForLong() throws {
        let queue = SharedIOQueue(lock: try ProtocolMutex(.plain))
        var before = timespec(), after = timespec()
        clock_gettime(CLOCK_MONOTONIC, &before)
        queue.portWrite(offset: 0, size: 4, value: .max)
        clock_gettime(CLOCK_MONOTONIC, &after)
        // Clamped to 10 ms of CPU time; allow for preemption, but not 71 minutes.
        #expect(after.tv_sec - before.tv_sec < 5)
        #expect(queue.requests == 1)
    }

    @Test func aCeilingBelowTheCallersPriorityRefusesTheLock() throws {
        guard realtimePermitted() else {
            print("skipped: SCHED_FIFO is not permitted here (needs root or CAP_SYS_NICE)")
            return
        }
        let queue = SharedIOQueue(lock: try ProtocolMutex(.ceiling, ceiling: 5))
        onRealtimeThread(priority: 20) { queue.portWrite(offset: 0, size: 4, value: 1) }
        #expect(queue.lockErrors == 1 && queue.requests == 0)
    }
}

/// Runs `body` on a new thread at SCHED_FIFO `priority` and waits for it.
func onRealtimeThread(priority: Int32, _ body: @escaping () -> Void) {
    final class Box { let body: () -> Void; let priority: Int32; init(_ b: @escaping () -> Void, _ p: Int32) { body = b; priority = p } }
    var thread = pthread_t()
    _ = pthread_create(&thread, nil, { arg in
        let box = Unmanaged<Box>.fromOpaque(arg!).takeRetainedValue()
        var param = sched_param()
        param.sched_priority = box.priority
        _ = pthread_setschedparam(pthread_self(), SCHED_FIFO, &param)
        box.body()
        return nil
    }, Unmanaged.passRetained(Box(body, priority)).toOpaque())
    pthread_join(thread, nil)
}
