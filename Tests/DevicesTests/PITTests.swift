import Devices
import Synchronization
import TestSupport
import Testing

/// The 8254 on a clock the test sets: every count is exact.
@Suite struct PITTests {
    final class Clock: Sendable {
        let nanoseconds = Mutex<UInt64>(5_000_000_000)
        /// Advances by `ticks` PIT ticks (the nanoseconds rounded up, so exactly that many ticks pass).
        func advance(ticks: UInt64) {
            nanoseconds.withLock { n in
                let target = ProgrammableIntervalTimer.ticks(nanoseconds: n) + ticks
                n = (target * 1_000_000_000 + ProgrammableIntervalTimer.frequency - 1) / ProgrammableIntervalTimer.frequency
            }
        }
        func advance(nanoseconds delta: UInt64) { nanoseconds.withLock { $0 += delta } }
        var now: UInt64 { nanoseconds.withLock { $0 } }
    }

    let clock = Clock()
    let pit: ProgrammableIntervalTimer
    let port61: ProgrammableIntervalTimer.SystemControlPort

    init() {
        let clock = clock
        pit = ProgrammableIntervalTimer(now: { clock.now })
        port61 = ProgrammableIntervalTimer.SystemControlPort(pit: pit)
    }

    func control(_ word: UInt8) { pit.portWrite(offset: 3, size: 1, value: UInt32(word)) }
    func load(_ channel: UInt16, _ count: UInt16) {
        pit.portWrite(offset: channel, size: 1, value: UInt32(count & 0xFF))
        pit.portWrite(offset: channel, size: 1, value: UInt32(count >> 8))
    }
    /// A two-byte read (LSB then MSB).
    func read(_ channel: UInt16) -> UInt16 {
        let low = pit.portRead(offset: channel, size: 1), high = pit.portRead(offset: channel, size: 1)
        return UInt16(high << 8 | low)
    }
    /// Channel 0's output, through the read-back command's status byte.
    func output0() -> Bool {
        control(0xE2)  // read-back: status only, channel 0
        return pit.portRead(offset: 0, size: 1) & 0x80 != 0
    }

    @Test func modeZeroCountsDownOnceAndWraps() {
        control(0x30)  // channel 0, LSB then MSB, mode 0, binary
        #expect(!output0(), "mode 0 output is low once programmed")
        load(0, 1000)
        #expect(read(0) == 1000)
        clock.advance(ticks: 400)
        #expect(read(0) == 600)
        #expect(!output0())
        clock.advance(ticks: 600)
        #expect(read(0) == 0)
        #expect(output0(), "the output rises at the terminal count")
        clock.advance(ticks: 5)
        #expect(read(0) == 0xFFFB, "the counter wraps on; the output stays high")
        #expect(output0())
    }

    @Test func modeTwoIsARateGenerator() {
        control(0x34)  // channel 0, mode 2
        load(0, 100)
        #expect(read(0) == 100)
        clock.advance(ticks: 98)
        #expect(read(0) == 2)
        #expect(output0())
        clock.advance(ticks: 1)
        #expect(read(0) == 1)
        #expect(!output0(), "low for the tick the count is 1")
        clock.advance(ticks: 1)
        #expect(read(0) == 100, "reloaded")
        #expect(output0())
        clock.advance(ticks: 250)
        #expect(read(0) == 50)
    }

    @Test func modeThreeIsASquareWave() {
        control(0x36)  // channel 0, mode 3
        load(0, 100)
        #expect(read(0) == 100 && output0())
        clock.advance(ticks: 10)
        #expect(read(0) == 80 && output0(), "counts down by two")
        clock.advance(ticks: 40)
        #expect(read(0) == 100 && !output0(), "second half: output low")
        clock.advance(ticks: 20)
        #expect(read(0) == 60 && !output0())
        clock.advance(ticks: 30)
        #expect(read(0) == 100 && output0(), "next period")
    }

    @Test func latchHoldsTheCountUntilRead() {
        control(0x30)
        load(0, 5000)
        clock.advance(ticks: 1000)
        control(0x00)  // latch channel 0
        clock.advance(ticks: 1000)
        control(0x00)  // a second latch is ignored while the first is unread
        #expect(read(0) == 4000)
        #expect(read(0) == 3000, "the latch is gone once read; the count went on")
        // Single-byte access: MSB only.
        control(0x60 | 0x04)  // channel 1, MSB only, mode 2
        pit.portWrite(offset: 1, size: 1, value: 0x12)
        #expect(pit.portRead(offset: 1, size: 1) == 0x12)
        clock.advance(ticks: 0x100)
        #expect(pit.portRead(offset: 1, size: 1) == 0x11)
    }

    @Test func readBackLatchesStatusThenCount() {
        control(0x31)  // channel 0, mode 0, BCD
        control(0xE2)
        #expect(pit.portRead(offset: 0, size: 1) == 0x71, "output low, null count, LSB/MSB, mode 0, BCD")
        load(0, 0x1234)
        clock.advance(ticks: 34)
        control(0xC2)  // read-back: count and status of channel 0
        clock.advance(ticks: 100)
        #expect(pit.portRead(offset: 0, size: 1) == 0x31, "status: count loaded")
        #expect(read(0) == 0x1200, "the BCD count when latched")
        #expect(read(0) == 0x1100, "live again")
    }

    @Test func channelTwoGateAndOutputThroughPort61() {
        // Linux's quick_pit_calibrate: gate high, speaker off; channel 2, mode 0, 0xFFFF.
        port61.portWrite(offset: 0, size: 1, value: 0x01)
        control(0xB0)
        load(2, 0xFFFF)
        #expect(port61.portRead(offset: 0, size: 1) & 0x2F == 0x01, "gate set, output low")
        clock.advance(ticks: 0x100)
        #expect(read(2) == 0xFEFF)
        port61.portWrite(offset: 0, size: 1, value: 0x00)  // gate low: the count holds
        clock.advance(ticks: 5000)
        #expect(read(2) == 0xFEFF)
        port61.portWrite(offset: 0, size: 1, value: 0x01)
        clock.advance(ticks: 0xFEFF)
        #expect(read(2) == 0 && port61.portRead(offset: 0, size: 1) & 0x20 != 0, "terminal count: bit 5 set")
        // Mode 2: the gate's rising edge reloads.
        control(0xB4)
        load(2, 1000)
        clock.advance(ticks: 300)
        port61.portWrite(offset: 0, size: 1, value: 0x00)
        port61.portWrite(offset: 0, size: 1, value: 0x01)
        #expect(read(2) == 1000)
        // The refresh bit toggles with time.
        let first = port61.portRead(offset: 0, size: 1) & 0x10
        clock.advance(nanoseconds: 15_085)
        #expect(port61.portRead(offset: 0, size: 1) & 0x10 != first)
    }

    @Test func channelZeroRaisesIRQ0() {
        let host = ProgrammableIntervalTimer()
        let edges = Atomic<Int>(0)
        let level = Mutex(false)
        host.connectIRQ0 { up in
            level.withLock { l in
                if up && !l { edges.add(1, ordering: .relaxed) }
                l = up
            }
        }
        host.portWrite(offset: 3, size: 1, value: 0x30)  // mode 0: one edge at the terminal count
        host.portWrite(offset: 0, size: 1, value: 0xA9)
        host.portWrite(offset: 0, size: 1, value: 0x04)  // 1193: 1 ms
        #expect(waitUntil(seconds: 10) { edges.load(ordering: .relaxed) == 1 })
        host.portWrite(offset: 3, size: 1, value: 0x34)  // mode 2: an edge each period
        host.portWrite(offset: 0, size: 1, value: 0xA9)
        host.portWrite(offset: 0, size: 1, value: 0x04)
        #expect(waitUntil(seconds: 10) { edges.load(ordering: .relaxed) >= 6 })
        let before = edges.load(ordering: .relaxed)
        host.portWrite(offset: 3, size: 1, value: 0x36)  // mode 3 (Linux's periodic tick)
        host.portWrite(offset: 0, size: 1, value: 0xA9)
        host.portWrite(offset: 0, size: 1, value: 0x04)
        #expect(waitUntil(seconds: 10) { edges.load(ordering: .relaxed) >= before + 3 })
    }

    @Test func snapshotKeepsTheCountGoing() throws {
        control(0x34)
        load(0, 1000)
        control(0x70)  // channel 1, LSB/MSB, mode 0
        pit.portWrite(offset: 1, size: 1, value: 0x34)  // half a count written
        clock.advance(ticks: 300)
        let saved = pit.savedState
        let other = Clock()
        other.nanoseconds.withLock { $0 = 77_000_000_000 }
        let restored = ProgrammableIntervalTimer(now: { other.now })
        try restored.restore(saved)
        #expect(restored.portRead(offset: 0, size: 1) == 700 & 0xFF)
        #expect(restored.portRead(offset: 0, size: 1) == 700 >> 8)
        restored.portWrite(offset: 1, size: 1, value: 0x12)
        #expect(restored.portRead(offset: 1, size: 1) == 0x34, "the half-written count completed after the restore")
    }
}
