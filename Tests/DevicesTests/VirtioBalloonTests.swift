import Synchronization
import TestSupport
import Testing
import VirtCore
@testable import Devices
#if canImport(Glibc)
import Glibc
#endif

@Suite struct VirtioBalloonTests {
    static let ramSize: UInt64 = 16 << 20
    static let page = VirtioBalloon.pageSize
    /// Balloon pages come from here up (the test guest's rings and heap sit below).
    static let firstBalloonPFN: UInt32 = 8 << 8  // 8 MiB

    func makeBalloon(target: UInt32 = 0, statistics: Bool = true,
                     onChange: @escaping @Sendable () -> Void = {}) throws -> (VirtioBalloon, VirtioTestGuest) {
        let balloon = VirtioBalloon(target: target, statisticsQueue: statistics, onChange: onChange)
        return (balloon, try VirtioTestGuest(balloon, ramSize: Self.ramSize))
    }

    func le(_ pfns: [UInt32]) -> [UInt8] { pfns.flatMap { withUnsafeBytes(of: $0.littleEndian, Array.init) } }

    /// Posts `pfns` on queue `q` in buffers of up to 256 and notifies once.
    func send(_ g: VirtioTestGuest, _ q: Int, _ pfns: [UInt32], notify: Bool = true) {
        for start in stride(from: 0, to: pfns.count, by: 256) {
            g.post(q, readable: [le(Array(pfns[start ..< min(start + 256, pfns.count)]))])
        }
        if notify { g.notify(q) }
    }

    func config32(_ g: VirtioTestGuest, _ offset: UInt64) -> UInt32 {
        UInt32(truncatingIfNeeded: g.transport.mmioRead(offset: VirtioMMIOTransport.configOffset + offset, size: 4))
    }

    func dirty(_ g: VirtioTestGuest, pfns: some Sequence<UInt32>) throws {
        for pfn in pfns { try g.memory.fill(0xAB, at: UInt64(pfn) * Self.page, count: Int(Self.page)) }
    }

    @Test func identityFeaturesAndConfigurationSpace() throws {
        let (balloon, g) = try makeBalloon(target: 1234)
        #expect(g.reg(Reg.deviceID) == 5)
        #expect(g.transport.offeredFeatures == VirtioFeature.version1 | VirtioBalloon.featureStatisticsQueue)
        #expect(VirtioBalloon(statisticsQueue: false).offeredFeatures == 0)
        g.start(queues: 3)
        #expect(config32(g, 0) == 1234)  // num_pages
        #expect(config32(g, 4) == 0)     // actual
        // The driver owns `actual`, at any access width; num_pages is read-only for it.
        g.transport.mmioWrite(offset: 0x104, size: 4, value: 0x0102_0304)
        #expect(balloon.actualPages == 0x0102_0304)
        g.transport.mmioWrite(offset: 0x105, size: 1, value: 0xFF)
        #expect(balloon.actualPages == 0x0102_FF04)
        g.transport.mmioWrite(offset: 0x100, size: 4, value: 7)
        #expect(config32(g, 0) == 1234)
        #expect(balloon.targetPages == 1234)
        // The config space is 8 bytes: beyond it is a driver fault.
        _ = g.transport.mmioRead(offset: 0x108, size: 4)
        #expect(g.transport.diagnostics.count(of: "configAccess") == 1)
    }

    @Test func inflateDiscardsThePagesAndTheHostGetsTheMemoryBack() throws {
        let (balloon, g) = try makeBalloon()
        g.start(queues: 3)
        let count = 1024  // 4 MiB
        let pfns = (0..<UInt32(count)).map { Self.firstBalloonPFN + $0 }
        try dirty(g, pfns: pfns)
        // Out of order: the device sorts and coalesces them into runs.
        var shuffled = pfns
        var rng = SplitMix64(seed: 5)
        shuffled.shuffle(using: &rng)
        send(g, VirtioBalloon.inflateQueue, shuffled, notify: false)
        let before = g.memory.allocatedBytes  // the PFN buffers themselves are written by now
        g.notify(VirtioBalloon.inflateQueue)
        let after = g.memory.allocatedBytes  // measured before anything reads the pages again
        #expect(g.takeUsed(VirtioBalloon.inflateQueue).map(\.length) == [0, 0, 0, 0])
        #expect(before - after == UInt64(count) * Self.page, "allocated \(before) → \(after)")
        let s = balloon.statistics
        #expect(s.inflateRequests == 4)
        #expect(s.inflatedPages == UInt64(count))
        #expect(s.discardedBytes == UInt64(count) * Self.page)
        #expect(s.returnedBytes == UInt64(count) * Self.page)
        #expect(s.rejectedPages == 0)
        #expect(balloon.balloonedPages == count)
        #expect(balloon.isBallooned(pfn: UInt64(Self.firstBalloonPFN)))
        #expect(!balloon.isBallooned(pfn: UInt64(Self.firstBalloonPFN) - 1))
        // The guest sees zeros where its data was.
        let bytes = try g.memory.read(at: UInt64(Self.firstBalloonPFN) * Self.page, count: count * Int(Self.page))
        #expect(bytes.allSatisfy { $0 == 0 })
        // Neighbours are untouched.
        #expect(try g.memory.load(UInt8.self, at: UInt64(Self.firstBalloonPFN + UInt32(count)) * Self.page) == 0)
        #expect(g.transport.diagnostics.errorCount == 0)
        #expect(g.recorder.lineAsserted)  // used-buffer interrupt
    }

    @Test func deflateIsBookkeepingAndDeflatedPagesCanBeBallonedAgain() throws {
        let (balloon, g) = try makeBalloon()
        g.start(queues: 3)
        let pfns = (0..<UInt32(16)).map { Self.firstBalloonPFN + $0 }
        try dirty(g, pfns: pfns)
        send(g, VirtioBalloon.inflateQueue, pfns)
        send(g, VirtioBalloon.deflateQueue, Array(pfns.prefix(8)))
        #expect(g.takeUsed(VirtioBalloon.deflateQueue).map(\.length) == [0])
        #expect(balloon.balloonedPages == 8)
        #expect(!balloon.isBallooned(pfn: UInt64(pfns[0])))
        #expect(balloon.isBallooned(pfn: UInt64(pfns[8])))
        // A deflated page is the guest's again: usable, and it starts out zero.
        let gpa = UInt64(pfns[0]) * Self.page
        #expect(try g.memory.load(UInt64.self, at: gpa) == 0)
        try g.memory.store(UInt64(0x1234), at: gpa)
        #expect(try g.memory.load(UInt64.self, at: gpa) == 0x1234)
        // Deflating a page that is not in the balloon is counted, not fatal.
        send(g, VirtioBalloon.deflateQueue, [pfns[0], Self.firstBalloonPFN + 100])
        #expect(balloon.statistics.rejectedNotInBalloon == 2)
        #expect(g.transport.diagnostics.count(of: "balloonPFNNotInBalloon") == 1)
        // Deflated pages may be inflated again.
        send(g, VirtioBalloon.inflateQueue, [pfns[0]])
        #expect(balloon.statistics.rejectedDuplicates == 0)
        #expect(balloon.balloonedPages == 9)
        #expect(try g.memory.load(UInt64.self, at: gpa) == 0)
        let s = balloon.statistics
        #expect(s.inflatedPages == 17)
        #expect(s.deflatedPages == 8)
        #expect(s.deflateRequests == 2)
        #expect(!g.transport.needsReset)
    }

    @Test func badPFNsAreCountedLoggedOnceAndNotFatal() throws {
        let (balloon, g) = try makeBalloon()
        g.start(queues: 3)
        let ramPages = UInt32(Self.ramSize / Self.page)
        let good = Self.firstBalloonPFN
        try dirty(g, pfns: [good, good + 1])
        send(g, VirtioBalloon.inflateQueue, [
            ramPages, 0xFFFF_FFFF,  // outside RAM
            0, 0xFF,                // the VMM's area below 1 MiB
            good, good,             // a duplicate within one buffer
        ])
        send(g, VirtioBalloon.inflateQueue, [good, ramPages + 5, 1, good + 1])  // again, and one good page
        #expect(g.takeUsed(VirtioBalloon.inflateQueue).count == 2)
        let s = balloon.statistics
        #expect(s.rejectedOutsideRAM == 3)
        #expect(s.rejectedReserved == 3)
        #expect(s.rejectedDuplicates == 2)
        #expect(s.rejectedPages == 8)
        #expect(s.inflatedPages == 2)
        #expect(balloon.balloonedPages == 2)
        #expect(s.discardedBytes == 2 * Self.page)
        // Low RAM is intact: nothing below 1 MiB was discarded.
        #expect(!balloon.isBallooned(pfn: 0))
        // One fault per request and reason; the first of each reason is logged.
        let d = g.transport.diagnostics
        #expect(d.count(of: "balloonPFNOutsideRAM") == 2)
        #expect(d.count(of: "balloonPFNReserved") == 2)
        #expect(d.count(of: "balloonPFNDuplicate") == 2)
        #expect(g.recorder.logLines.count == 3)
        #expect(g.recorder.logLines.contains { $0.contains("2 PFNs outside the 16 MiB of RAM (first: 0x1000)") })
        #expect(g.recorder.logLines.contains { $0.contains("below 0x100000") })
        // A buffer that is not a whole number of PFNs: the whole ones count.
        g.post(VirtioBalloon.inflateQueue, readable: [le([good + 2]) + [1, 2]])
        g.notify(VirtioBalloon.inflateQueue)
        #expect(d.count(of: "balloonPartialPFN") == 1)
        #expect(balloon.isBallooned(pfn: UInt64(good + 2)))
        // None of it broke the device.
        #expect(!g.transport.needsReset)
        send(g, VirtioBalloon.inflateQueue, [good + 3])
        #expect(balloon.balloonedPages == 4)
    }

    @Test func targetChangesRaiseTheConfigurationInterrupt() throws {
        let (balloon, g) = try makeBalloon()
        // Before DRIVER_OK: the generation moves, no interrupt.
        balloon.setTarget(pages: 10)
        #expect(g.transport.configGeneration == 1)
        #expect(g.transport.interruptStatus == 0)
        g.start(queues: 3)
        #expect(config32(g, 0) == 10)
        g.ackInterrupts()
        #expect(!g.recorder.lineAsserted)
        balloon.setTarget(pages: 16384)
        #expect(g.transport.interruptStatus == VirtioInterrupt.configurationChange)
        #expect(g.recorder.lineAsserted)
        #expect(g.transport.configGeneration == 2)
        #expect(config32(g, 0) == 16384)
        #expect(balloon.targetPages == 16384)
        g.ackInterrupts()
        // From another thread too.
        let t = startVirtioThread { balloon.setTarget(pages: VirtioBalloon.quitTarget) }
        pthread_join(t, nil)
        #expect(g.transport.interruptStatus & VirtioInterrupt.configurationChange != 0)
        #expect(config32(g, 0) == 0xFFFF_FFFF)
    }

    @Test func statisticsQueueReportsTheGuestsFreeMemory() throws {
        let changes = Atomic<Int>(0)
        let (balloon, g) = try makeBalloon(onChange: { changes.add(1, ordering: .relaxed) })
        g.start(queues: 3)
        #expect(g.transport.negotiatedFeatures & VirtioBalloon.featureStatisticsQueue != 0)
        func entries(_ e: [(UInt16, UInt64)]) -> [UInt8] {
            e.flatMap { withUnsafeBytes(of: $0.0.littleEndian, Array.init) + withUnsafeBytes(of: $0.1.littleEndian, Array.init) }
        }
        // The driver's first buffer: the device keeps it.
        let first = g.post(VirtioBalloon.statisticsQueue, readable: [entries([(4, 5 << 20), (5, 16 << 20)])])
        g.notify(VirtioBalloon.statisticsQueue)
        #expect(balloon.guestStatistics?.freeMemory == 5 << 20)
        #expect(balloon.guestStatistics?.totalMemory == 16 << 20)
        #expect(g.takeUsed(VirtioBalloon.statisticsQueue).isEmpty)
        #expect(changes.load(ordering: .relaxed) == 1)
        // The host asks: the buffer comes back, with an interrupt.
        g.ackInterrupts()
        balloon.requestGuestStatistics()
        #expect(g.takeUsed(VirtioBalloon.statisticsQueue).map(\.id) == [UInt32(first.head)])
        #expect(g.transport.interruptStatus == VirtioInterrupt.usedBuffer)
        // The driver refills it.
        g.post(VirtioBalloon.statisticsQueue, readable: [entries([(4, 3 << 20), (6, 3 << 20)])])
        g.notify(VirtioBalloon.statisticsQueue)
        #expect(balloon.guestStatistics?.freeMemory == 3 << 20)
        #expect(balloon.guestStatistics?.availableMemory == 3 << 20)
        #expect(balloon.guestStatistics?.totalMemory == nil)
        #expect(balloon.statistics.statisticsUpdates == 2)
        // A request before the driver has a buffer there waits for the next one.
        balloon.requestGuestStatistics()
        #expect(g.takeUsed(VirtioBalloon.statisticsQueue).count == 1)
        balloon.requestGuestStatistics()
        #expect(g.takeUsed(VirtioBalloon.statisticsQueue).isEmpty)
        g.post(VirtioBalloon.statisticsQueue, readable: [entries([(4, 1)]) + [9, 9, 9]])  // with a ragged tail
        g.notify(VirtioBalloon.statisticsQueue)
        #expect(g.takeUsed(VirtioBalloon.statisticsQueue).count == 1)
        #expect(balloon.guestStatistics?.freeMemory == 1)
        #expect(g.transport.diagnostics.count(of: "balloonStatsMalformed") == 1)
    }

    @Test func resetEmptiesTheBalloonButKeepsTheTarget() throws {
        let (balloon, g) = try makeBalloon(target: 64)
        g.start(queues: 3)
        send(g, VirtioBalloon.inflateQueue, (0..<UInt32(8)).map { Self.firstBalloonPFN + $0 })
        g.transport.mmioWrite(offset: 0x104, size: 4, value: 8)
        #expect(balloon.balloonedPages == 8)
        #expect(balloon.actualPages == 8)
        g.reset()
        #expect(balloon.balloonedPages == 0)
        #expect(balloon.actualPages == 0)
        #expect(balloon.targetPages == 64)
        g.start(queues: 3)
        send(g, VirtioBalloon.inflateQueue, [Self.firstBalloonPFN])
        #expect(balloon.statistics.rejectedDuplicates == 0)
        #expect(balloon.balloonedPages == 1)
    }

    @Test func onChangeMayReadTheDeviceAndSetATarget() throws {
        let seen = Mutex<[UInt32]>([])
        let box = Mutex<VirtioBalloon?>(nil)
        let (balloon, g) = try makeBalloon(onChange: {
            guard let b = box.withLock({ $0 }) else { return }
            seen.withLock { $0.append(b.actualPages) }
            // A host policy reacting to the guest: no lock is held here.
            if b.actualPages == 4 { b.setTarget(pages: 0) }
        })
        box.withLock { $0 = balloon }
        g.start(queues: 3)
        balloon.setTarget(pages: 4)
        send(g, VirtioBalloon.inflateQueue, (0..<UInt32(4)).map { Self.firstBalloonPFN + $0 })
        g.transport.mmioWrite(offset: 0x104, size: 4, value: 4)
        #expect(seen.withLock { $0 } == [0, 4])
        #expect(balloon.targetPages == 0)
        #expect(config32(g, 0) == 0)
    }

    @Test func withoutStatisticsTheDriverNegotiatesTwoQueues() throws {
        let (balloon, g) = try makeBalloon(statistics: false)
        g.start(queues: 2)
        #expect(g.transport.negotiatedFeatures == VirtioFeature.version1)
        send(g, VirtioBalloon.inflateQueue, [Self.firstBalloonPFN])
        #expect(balloon.balloonedPages == 1)
        balloon.requestGuestStatistics()  // nothing to hand back; harmless
        #expect(balloon.guestStatistics == nil)
        #expect(g.transport.diagnostics.errorCount == 0)
    }
}
