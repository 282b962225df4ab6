import Dispatch
import VirtCore

/// The platform timer on the vCPU's own clock: its TSC (the retired-instruction count, plus
/// the time a `hlt` waited). The VMM's local APIC arms a deadline in TSC ticks; the run loop
/// caps each block at it and reports it once reached, so a guest that compares the APIC
/// timer with RDTSC sees them agree however busy the host is. A `hlt` with interrupts
/// enabled and a deadline armed waits out the time to it here, host nanoseconds passing
/// as TSC ticks (the APIC timer's nominal 1 GHz), and ends early for an interrupt, an NMI
/// or an exit request (then it is still halted at the next `run()`).
extension SoftwareVirtualCPU {
    public func setTimerDeadline(_ tsc: UInt64?) {
        cpu.timerDeadline = tsc ?? .max
        cpu.attention = true  // the run loop looks at it after the current instruction
    }

    /// Reports a deadline that passed, and waits while `hlt` waits for the timer. Returns
    /// `.halt` when the halted vCPU has no deadline left (the VMM then waits for an
    /// interrupt, as for any `hlt`).
    func waitForTimer() -> VMExit? {
        while true {
            let tsc = cpu.instructions &+ cpu.tscOffset
            if cpu.timerDeadline != .max && tsc >= cpu.timerDeadline {
                cpu.timerDeadline = .max
                interruptController?.timerDeadlineReached(vcpu: id, tsc: tsc)  // may arm the next one
                continue
            }
            guard cpu.waitingForTimer else { return nil }
            if hasPendingInterrupt {
                cpu.waitingForTimer = false
                return nil
            }
            if exitIsRequested { return nil }
            guard cpu.timerDeadline != .max else {
                cpu.waitingForTimer = false
                return .halt
            }
            let remaining = cpu.timerDeadline - tsc
            idle.store(true, ordering: .sequentiallyConsistent)
            if !hasPendingInterrupt && !exitIsRequested {
                let start = monotonicNanoseconds()
                let wait = min(remaining, 3_600_000_000_000)  // an hour at most per wait
                let woken = idleWake.wait(timeout: .now() + .nanoseconds(Int(wait))) == .success
                cpu.tscOffset &+= woken ? min(remaining, monotonicNanoseconds() &- start) : wait
            }
            idle.store(false, ordering: .sequentiallyConsistent)
        }
    }
}
