import Devices
import GuestImages
import Synchronization
import TestSupport
import Testing
import VirtCore
@testable import VMM
#if canImport(Glibc)
import Glibc
#endif

/// Device interrupts reach a guest waiting in `hlt`, on both engines: a host thread raises
/// irq 5 again each time the guest reports (on the bench port) that it handled the last one.
@Suite struct InterruptDeliveryTests {
    @Test(arguments: TestEngines.available)
    func guestWaitingInHaltTakesEachInterrupt(engine choice: EngineChoice) throws {
        let engine = try TestEngines.make(choice)
        let guest = try #require(BundledGuests.named("irq-test"))
        let capture = SerialCapture()
        let machine = try Machine(image: try ELFImage(bytes: guest.elf),
                                  configuration: MachineConfiguration(memorySize: 16 << 20, commandLine: "count=3", timeoutSeconds: 60),
                                  engine: engine, serialOutput: capture.append)
        let line = machine.interruptLine(irq: 5)
        let finished = Atomic<Bool>(false)
        let raiser = HostThread(name: "raiser") {
            for handled in UInt64(0)..<3 {
                // Wait until the guest handled `handled` interrupts (or the run ended).
                while machine.benchPort.writes < handled {
                    if finished.load(ordering: .acquiring) { return }
                    usleep(200)
                }
                line(false)
                line(true)
            }
        }
        let r = try machine.run()
        finished.store(true, ordering: .releasing)
        raiser.join()
        #expect(r.stopReason == .exitPort(status: 0))
        #expect(capture.text == "waiting for 3 interrupts\ntook 3 interrupts\n")
        #expect(machine.benchPort.writes == 3)
        #expect(machine.benchPort.lastWritten == 5)
    }
}

@Suite struct KickAfterRunTests {
    /// Kicks after the vCPU threads ended (a late timer, a device interrupt, `stop()` after
    /// the guest exited) must not signal the dead threads: that is undefined and crashed
    /// the process now and then.
    @Test(arguments: TestEngines.available)
    func stopAndInterruptsAfterTheRunEndedAreHarmless(engine: EngineChoice) throws {
        for _ in 0..<20 {
            let r = try runGuest("hello", engine: engine)
            #expect(r.result.stopReason == .exitPort(status: 0))
            for _ in 0..<50 {
                r.machine.stop()
                r.machine.raiseInterrupt(vector: 0x21, vcpu: 0)
            }
        }
    }
}
