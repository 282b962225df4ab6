import Devices
import Testing

@Suite struct CMOSClockTests {
    /// 2026-11-29 16:07:05 UTC, a Sunday.
    static let instant = 1_795_968_425

    func read(_ rtc: CMOSClock, _ index: UInt8) -> UInt8 {
        rtc.portWrite(offset: 0, size: 1, value: UInt32(index) | 0x80)  // NMI-mask bit ignored
        return UInt8(rtc.portRead(offset: 1, size: 1))
    }

    @Test func readsTheHostTimeInBCDAndBinary() {
        let rtc = CMOSClock(now: { Self.instant })
        #expect(read(rtc, 0x0A) & 0x80 == 0, "no update in progress, ever")
        #expect([0x00, 0x02, 0x04, 0x06, 0x07, 0x08, 0x09, 0x32].map { read(rtc, $0) } == [0x05, 0x07, 0x16, 0x01, 0x29, 0x11, 0x26, 0x20])
        rtc.portWrite(offset: 0, size: 1, value: 0x0B)
        rtc.portWrite(offset: 1, size: 1, value: 0x06)  // binary, 24-hour
        #expect([0x04, 0x07, 0x09].map { read(rtc, $0) } == [16, 29, 26])
        rtc.portWrite(offset: 0, size: 1, value: 0x0B)
        rtc.portWrite(offset: 1, size: 1, value: 0x00)  // BCD, 12-hour: 4 pm
        #expect(read(rtc, 0x04) == 0x84)
    }

    @Test func keepsCMOSRAMAndIgnoresClockWrites() {
        let rtc = CMOSClock(now: { Self.instant })
        rtc.portWrite(offset: 0, size: 1, value: 0x40)
        rtc.portWrite(offset: 1, size: 1, value: 0x5A)
        #expect(read(rtc, 0x40) == 0x5A)
        rtc.portWrite(offset: 0, size: 1, value: 0x00)
        rtc.portWrite(offset: 1, size: 1, value: 0x59)
        #expect(read(rtc, 0x00) == 0x05)
        #expect(read(rtc, 0x0D) == 0x80)
    }
}
