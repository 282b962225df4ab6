import Devices
import GuestImages
import Synchronization
import Testing
import TestSupport
import VirtCore
@testable import VMM
#if canImport(Glibc)
import Glibc
#endif

/// S12's partitions: what the host allows is checked up front with clear errors; a policy
/// applied to a thread takes effect; a machine runs its vCPU thread setup first.
@Suite struct PartitionTests {
    @Test func refusesCPUsAndPrioritiesTheHostDoesNotHave() throws {
        let available = Partitioning.availableCPUs()
        #expect(!available.isEmpty)
        #expect(throws: PartitionError.cpuUnavailable(cpu: 4000, available: available)) {
            try Partitioning.check(PartitionPolicy(cpus: [4000]))
        }
        #expect(throws: PartitionError.self) { try Partitioning.check(PartitionPolicy(fifoPriority: 500)) }
        let error = PartitionError.realtimeRefused(priority: 50, errno: EPERM)
        #expect(error.description.contains("needs root or CAP_SYS_NICE"))
    }

    @Test func pinningTakesEffectOnTheThread() throws {
        let cpu = try #require(Partitioning.availableCPUs().last)
        let seen = Mutex<[Int]>([])
        let t = HostThread(name: "pin-test") {
            do { try Partitioning.apply(PartitionPolicy(cpus: [cpu])) } catch { return }
            seen.withLock { $0 = Partitioning.availableCPUs() }
        }
        t.join()
        #expect(seen.withLock { $0 } == [cpu])
    }

    @Test func realtimePriorityIsAppliedWhereTheHostAllowsIt() throws {
        do {
            try Partitioning.check(PartitionPolicy(fifoPriority: 10))
        } catch {
            print("skipped: \(error)")  // not root and no CAP_SYS_NICE: the check says so
            return
        }
        let policy = Mutex<Int32>(-1)
        let t = HostThread(name: "rt-test") {
            do { try Partitioning.apply(PartitionPolicy(fifoPriority: 10)) } catch { return }
            var p: Int32 = 0
            var param = sched_param()
            pthread_getschedparam(pthread_self(), &p, &param)
            policy.withLock { $0 = p }
        }
        t.join()
        #expect(policy.withLock { $0 } == SCHED_FIFO)
    }

    @Test func memoryLockingLocksGuestRAM() throws {
        let memory = try GuestMemory(size: 4 << 20)
        do { try Partitioning.lock(memory) } catch {
            print("skipped: \(error)")
            return
        }
        // Locked pages are resident: every page is allocated in the memfd now.
        #expect(memory.allocatedBytes == 4 << 20)
    }

    @Test(arguments: TestEngines.available)
    func vcpuThreadSetupRunsOnEachVCPUThreadAndItsErrorStopsTheMachine(engine: EngineChoice) throws {
        let ids = Mutex<[Int]>([])
        let capture = SerialCapture()
        let guest = try #require(BundledGuests.named("hello"))
        var config = MachineConfiguration(memorySize: 32 << 20, vcpuCount: 2, timeoutSeconds: 60)
        config.vcpuThreadSetup = { id in
            ids.withLock { $0.append(id) }
            if id == 0 { throw PartitionError.cpuUnavailable(cpu: 7, available: [0, 1]) }
        }
        let m = try Machine(image: try ELFImage(bytes: guest.elf), configuration: config, engine: try TestEngines.make(engine),
                            serialOutput: capture.append)
        let r = try m.run()
        // vCPU 1 may not have started before the stop: only vCPU 0's setup is certain.
        #expect(ids.withLock { $0.contains(0) })
        guard case let .engineFailure(vcpu, .threadSetup(message)) = r.stopReason else {
            Issue.record("expected the setup error to stop the machine, got \(r.stopReason)")
            return
        }
        #expect(vcpu == 0 && message.contains("host CPU 7 is not available"))
    }

    @Test func periodicTimerIsListedAndFires() throws {
        let capture = SerialCapture()
        let m = try bundledMachine("irq-test", engine: .software, commandLine: "count=5", capture: capture)
        let timer = try PeriodicTimer(machine: m, periodNanoseconds: 200_000)
        timer.start()
        let r = try m.run()
        timer.stop()
        #expect(r.stopReason == .exitPort(status: 0), "\(capture.text)")
        #expect(capture.text.contains("took 5 interrupts"), "\(capture.text)")
        #expect(timer.fired >= 5)
    }
}
