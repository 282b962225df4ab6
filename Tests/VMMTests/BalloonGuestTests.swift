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

/// The `balloon` guest against `VirtioBalloon`, on both engines: the host sets targets
/// from its own thread and watches the guest give memory back.
@Suite struct BalloonGuestTests {
    static let ram: UInt64 = 128 << 20
    static let mib: UInt64 = 1 << 20

    func balloonMachine(engine: EngineChoice, commandLine: String, capture: SerialCapture) throws -> Machine {
        let guest = try #require(BundledGuests.named("balloon"))
        return try Machine(image: try ELFImage(bytes: guest.elf),
                           configuration: MachineConfiguration(memorySize: Self.ram, commandLine: commandLine, timeoutSeconds: 120),
                           engine: try TestEngines.make(engine), serialOutput: capture.append)
    }

    /// Waits until the guest printed `text` (or gave up after a minute).
    func waitFor(_ text: String, _ capture: SerialCapture, _ finished: () -> Bool) -> Bool {
        _ = waitUntil { capture.text.contains(text) || finished() }
        return capture.text.contains(text)
    }

    @Test(arguments: TestEngines.available, [true, false])
    func hostInflatesAndDeflatesARunningGuest(engine: EngineChoice, interrupts: Bool) throws {
        let capture = SerialCapture()
        let m = try balloonMachine(engine: engine, commandLine: "irq=\(interrupts ? 1 : 0) check=1", capture: capture)
        let changes = Atomic<Int>(0)
        let balloon = VirtioBalloon(onChange: { changes.add(1, ordering: .relaxed) })
        let transport = try m.addVirtioDevice(balloon, name: "virtio-balloon")
        let result = Mutex<Result<RunResult, any Error>?>(nil)
        let finished = Atomic<Bool>(false)
        let vm = HostThread(name: "balloon-vm") {
            let r = Result { try m.run() }
            result.withLock { $0 = r }
            finished.store(true, ordering: .releasing)
        }
        let isFinished = { finished.load(ordering: .acquiring) }
        var joined = false
        defer {
            if !joined {  // a failed expectation: stop the guest, then collect the thread
                m.stop()
                vm.join()
            }
        }

        try #require(waitFor("balloon: target 0 pages, actual 0 pages\n", capture, isFinished), "\(capture.text)")
        #expect(capture.text.hasPrefix("balloon: pool "))
        #expect(capture.text.contains(interrupts ? ", interrupts, statistics\n" : ", polling, statistics\n"))
        // The guest has written to every page of its pool: the host backs nearly all of RAM.
        let before = m.memory.allocatedBytes
        #expect(before > Self.ram - 8 * Self.mib, "allocated \(before)")

        // Inflate by 64 MiB.
        balloon.setTarget(pages: 16384)
        try #require(waitFor("balloon: target 16384 pages, actual 16384 pages\n", capture, isFinished), "\(capture.text)")
        #expect(balloon.actualPages == 16384)
        #expect(balloon.balloonedPages == 16384)
        let inflated = m.memory.allocatedBytes
        let returned = before > inflated ? before - inflated : 0
        print("balloon guest (\(engine), \(interrupts ? "interrupts" : "polling")): 64 MiB inflation returned \(returned / Self.mib) MiB "
              + "(\(returned) bytes; allocated \(before / Self.mib) → \(inflated / Self.mib) MiB; device counted \(balloon.statistics.returnedBytes) bytes)")
        #expect(returned >= 63 * Self.mib, "allocated \(before) → \(inflated)")
        #expect(balloon.statistics.discardedBytes == 64 * Self.mib)
        #expect(balloon.statistics.inflateRequests == 64)  // 256 PFNs per buffer

        // The guest reports what it has left.
        balloon.requestGuestStatistics()
        #expect(waitUntil(seconds: 30) { balloon.statistics.statisticsUpdates >= 2 })
        let free = try #require(balloon.guestStatistics?.freeMemory)
        #expect(free < Self.ram - 64 * Self.mib)
        #expect(balloon.guestStatistics?.totalMemory == Self.ram)

        // Deflate to 16 MiB: the host takes nothing back, the guest may use the pages again.
        balloon.setTarget(pages: 4096)
        try #require(waitFor("balloon: target 4096 pages, actual 4096 pages\n", capture, isFinished), "\(capture.text)")
        #expect(balloon.balloonedPages == 4096)
        #expect(balloon.statistics.deflatedPages == 12288)
        #expect(m.memory.allocatedBytes <= inflated + Self.mib)

        balloon.setTarget(pages: VirtioBalloon.quitTarget)
        vm.join()
        joined = true
        let r = try #require(result.withLock { $0 }).get()
        #expect(r.stopReason == .exitPort(status: 0), "\(capture.text)")
        // 64 + 48 requests, 2 statistics buffers; each deflated page the guest read back was zero.
        #expect(capture.text.hasSuffix("balloon: quit with 4096 pages in the balloon (16384 inflated, 12288 deflated, 112 requests, "
                                       + "2 statistics updates; 48 deflated pages checked, 0 stale)\n"))
        #expect(balloon.statistics.rejectedPages == 0)
        #expect(transport.diagnostics.errorCount == 0, "\(transport.diagnostics.counts)")
        #expect(!transport.needsReset)
        #expect(changes.load(ordering: .relaxed) > 0)
    }

    @Test(arguments: TestEngines.available)
    func guestActsOnTheTargetItBootsWith(engine: EngineChoice) throws {
        let capture = SerialCapture()
        let m = try balloonMachine(engine: engine, commandLine: "rounds=1", capture: capture)
        let balloon = VirtioBalloon(target: 2560)  // 10 MiB
        try m.addVirtioDevice(balloon, name: "virtio-balloon")
        let r = try m.run()
        #expect(r.stopReason == .exitPort(status: 0), "\(capture.text)")
        #expect(capture.text.hasSuffix("balloon: target 2560 pages, actual 2560 pages\n"))
        #expect(balloon.actualPages == 2560)
        #expect(balloon.balloonedPages == 2560)
        #expect(balloon.statistics.inflateRequests == 10)
    }

    /// A host policy in `onChange`: deflate once the guest reached the target, then quit.
    /// With every page refused (`protectedBelow` = all of RAM) nothing is discarded, so the
    /// guest's read-back check must see its old data: it shows the check is not vacuous.
    @Test(arguments: TestEngines.available, [false, true])
    func hostPolicyInOnChangeAndTheReadBackCheck(engine: EngineChoice, refuseAll: Bool) throws {
        let capture = SerialCapture()
        let m = try balloonMachine(engine: engine, commandLine: "check=1", capture: capture)
        let box = Mutex<VirtioBalloon?>(nil)
        let balloon = VirtioBalloon(target: 512, protectedBelow: refuseAll ? Self.ram : 1 << 20, onChange: {
            guard let b = box.withLock({ $0 }) else { return }
            if b.targetPages == 512, b.actualPages == 512 { b.setTarget(pages: 0) }
            if b.targetPages == 0, b.actualPages == 0 { b.setTarget(pages: VirtioBalloon.quitTarget) }
        })
        box.withLock { $0 = balloon }
        let transport = try m.addVirtioDevice(balloon, name: "virtio-balloon")
        let r = try m.run()
        #expect(r.stopReason == .exitPort(status: 0), "\(capture.text)")
        let lines = capture.text.split(separator: "\n").dropFirst().map(String.init)
        #expect(lines.first == "balloon: target 512 pages, actual 512 pages")
        #expect(lines.dropFirst().first == "balloon: target 0 pages, actual 0 pages")
        #expect(lines.last?.hasSuffix("2 deflated pages checked, \(refuseAll ? 2 : 0) stale)") == true, "\(capture.text)")
        #expect(balloon.statistics.rejectedReserved == (refuseAll ? 512 : 0))
        #expect(balloon.statistics.rejectedNotInBalloon == (refuseAll ? 512 : 0))
        #expect(transport.diagnostics.count(of: "balloonPFNReserved") == (refuseAll ? 2 : 0))
        #expect(!transport.needsReset)
    }

    @Test func targetBeyondThePoolStopsWhenThePoolIsEmpty() throws {
        let capture = SerialCapture()
        let m = try balloonMachine(engine: .software, commandLine: "rounds=1 touch=0", capture: capture)
        let balloon = VirtioBalloon(target: UInt32(Self.ram / 4096))  // all of RAM: more than the guest can give
        try m.addVirtioDevice(balloon, name: "virtio-balloon")
        let r = try m.run()
        #expect(r.stopReason == .exitPort(status: 0), "\(capture.text)")
        let actual = balloon.actualPages
        #expect(actual > 0 && actual < UInt32(Self.ram / 4096))
        #expect(capture.text.hasSuffix("balloon: target 32768 pages, actual \(actual) pages\n"))
        #expect(balloon.statistics.rejectedPages == 0)
    }

    @Test func withoutADeviceTheGuestSaysSo() throws {
        let capture = SerialCapture()
        let m = try balloonMachine(engine: .software, commandLine: "", capture: capture)
        let r = try m.run()
        #expect(r.stopReason == .exitPort(status: 3))
        #expect(capture.text == "balloon: no usable virtio-balloon device (-1)\n")
    }
}
