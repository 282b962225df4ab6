import Dispatch
import Synchronization
import VirtCore

/// Application processors of a PC machine: each waits in wait-for-SIPI until a local APIC
/// sends it INIT and then STARTUP, and begins in real mode at the STARTUP vector's page.
package final class StartupGate: Sendable {
    private enum Phase { case waitingForINIT, waitingForSIPI, started(UInt8) }
    private final class Slot: Sendable {
        let phase = Mutex(Phase.waitingForINIT)
        let signal = DispatchSemaphore(value: 0)
    }
    private let slots: [Slot]

    package init(vcpuCount: Int) { slots = (0..<vcpuCount).map { _ in Slot() } }

    package func initCPU(_ vcpu: Int) {
        guard vcpu < slots.count else { return }
        slots[vcpu].phase.withLock { if case .waitingForINIT = $0 { $0 = .waitingForSIPI } }
    }

    package func startup(_ vcpu: Int, vector: UInt8) {
        guard vcpu < slots.count else { return }
        let started = slots[vcpu].phase.withLock { p -> Bool in
            guard case .waitingForSIPI = p else { return false }  // a second SIPI is ignored
            p = .started(vector)
            return true
        }
        if started { slots[vcpu].signal.signal() }
    }

    /// Every application processor has had its STARTUP IPI (so each runs from its own state).
    package var allStarted: Bool {
        slots.dropFirst().allSatisfy { slot in slot.phase.withLock { if case .started = $0 { true } else { false } } }
    }

    /// Blocks vCPU `vcpu`'s thread until its STARTUP IPI (its entry state) or until
    /// `stopped()` (nil).
    package func waitForStartup(vcpu: Int, stopped: () -> Bool) -> VCPUState? {
        while !stopped() {
            if case let .started(vector) = slots[vcpu].phase.withLock({ $0 }) {
                return MultibootKernel.startupState(vector: vector)
            }
            _ = slots[vcpu].signal.wait(timeout: .now() + .milliseconds(20))
        }
        return nil
    }
}
