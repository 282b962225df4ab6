#if canImport(Glibc)
import Glibc
#endif
import VirtCore

/// PAUSE, the spin-wait hint (never translated: it ends a translated block). A guest
/// spinning on memory another vCPU will write — a lock, a handshake counter — gets nowhere
/// while the host has that vCPU's thread descheduled, which on a loaded host is most of the
/// time. As KVM's pause-loop exiting does, the spinning vCPU gives up the host CPU: every
/// 16th PAUSE yields, and the host time it was away passes as guest time (TSC ticks at the
/// APIC timer's nominal 1 GHz, as while a `hlt` waits), so a loop that waits a number of
/// TSC ticks ends in about that much real time. Each PAUSE also ends the block, so an
/// interrupt or NMI another vCPU sent is taken before the next iteration.
extension CPU {
    func spinWaitHint() {
        attention = true
        pauses &+= 1
        guard pauses & 15 == 0 else { return }
        let start = monotonicNanoseconds()
        sched_yield()
        tscOffset &+= monotonicNanoseconds() &- start
    }
}
