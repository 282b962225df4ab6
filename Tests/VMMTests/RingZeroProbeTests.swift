import Synchronization
import TestSupport
import Testing
import VMM
import VirtCore

/// `run --kernel` measures how fast KVM runs ring-0 code before it picks KVM for a kernel:
/// this host's nested KVM emulates it, and a Linux kernel would take hours there.
struct RingZeroProbeTests {
    @Test(arguments: TestEngines.available)
    func probeMeasuresRingZeroCode(_ engine: EngineChoice) throws {
        let rate = try RingZeroProbe.instructionsPerSecond(on: try TestEngines.make(engine))
        #expect(rate > 0 && rate.isFinite)
    }

    @Test func kernelEngineFollowsTheProbe() throws {
        let notices = Mutex<[String]>([])
        let chosen = try EngineSelection.forKernel(requested: nil) { m in notices.withLock { $0.append(m) } }
        guard kvmUsable else {
            #expect(chosen.name == "software")
            return
        }
        let native = RingZeroProbe.runsRingZeroNatively(try TestEngines.make(.kvm))
        #expect(chosen.name == (native ? "kvm" : "software"))
        // Passing KVM over is always said, with the measured rate.
        #expect(notices.withLock { $0.isEmpty } == native)
        if !native { #expect(notices.withLock { $0.first?.contains("M instructions/s") == true }) }
    }

    @Test func requestedEnginesAreKeptAndAnEmulatingKVMIsWarnedOf() throws {
        #expect(try EngineSelection.forKernel(requested: .software) { _ in Issue.record("no notice expected") }.name == "software")
        guard kvmUsable else { return }
        let notices = Mutex<[String]>([])
        let chosen = try EngineSelection.forKernel(requested: .kvm) { m in notices.withLock { $0.append(m) } }
        #expect(chosen.name == "kvm")
        let native = RingZeroProbe.runsRingZeroNatively(try TestEngines.make(.kvm))
        #expect(notices.withLock { $0.contains { $0.contains("1000×") } } == !native)
    }
}
