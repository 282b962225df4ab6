import Synchronization
import TestSupport
import Testing
@testable import Devices

final class RecordingMMIO: MMIODevice {
    let name = "recorder"
    let lastWrite = Mutex<(UInt64, UInt8, UInt64)?>(nil)
    func mmioRead(offset: UInt64, size: UInt8) -> UInt64 { 0x1000 + offset }
    func mmioWrite(offset: UInt64, size: UInt8, value: UInt64) { lastWrite.withLock { $0 = (offset, size, value) } }
}

@Suite struct IOBusTests {
    @Test func dispatchesPortsByRangeWithOffsets() throws {
        var builder = IOBusBuilder()
        let sink = SerialCapture()
        let uart = UART16550(output: sink.append)
        try builder.attach(uart, firstPort: 0x3F8, count: 8)
        let bus = builder.freeze()
        bus.portWrite(0x3F8, size: 1, value: 0x41)
        #expect(sink.text == "A")
        #expect(bus.portRead(0x3FD, size: 1) & 0x20 != 0)  // LSR.THRE
        #expect(bus.deviceName(port: 0x3FF) == "com1")
        #expect(bus.deviceName(port: 0x400) == nil)
    }

    @Test func unhandledAccessesReadAllOnesAndAreCounted() {
        let bus = IOBusBuilder().freeze()
        #expect(bus.portRead(0x1234, size: 1) == 0xFF)
        #expect(bus.portRead(0x1234, size: 2) == 0xFFFF)
        #expect(bus.portRead(0x1234, size: 4) == 0xFFFF_FFFF)
        bus.portWrite(0x1234, size: 1, value: 0)
        #expect(bus.mmioRead(0xE000_0000, size: 4).value == 0xFFFF_FFFF)
        #expect(bus.mmioRead(0xE000_0000, size: 8).range == nil)
        #expect(bus.unhandledAccesses == 6)
    }

    @Test func rejectsOverlaps() throws {
        var bus = IOBusBuilder()
        try bus.attach(BenchPort(), firstPort: 0x80, count: 1)
        #expect(throws: IOBusError.portRangeOverlaps(first: 0x7F, count: 2, existing: "bench-port")) {
            try bus.attach(BenchPort(), firstPort: 0x7F, count: 2)
        }
        try bus.attach(RecordingMMIO(), base: 0xD000_0000, size: 0x1000)
        #expect(throws: IOBusError.self) { try bus.attach(RecordingMMIO(), base: 0xD000_0FFF, size: 2) }
        #expect(throws: IOBusError.emptyRange) { try bus.attach(RecordingMMIO(), base: 0xD000_2000, size: 0) }
        #expect(throws: IOBusError.emptyRange) { try bus.attach(BenchPort(), firstPort: 0xFFFF, count: 2) }
    }

    @Test func aFrozenBusKeepsWhatWasAttachedThen() throws {
        var builder = IOBusBuilder()
        try builder.attach(BenchPort(), firstPort: 0x80, count: 1)
        let bus = builder.freeze()
        try builder.attach(RecordingMMIO(), base: 0xD000_0000, size: 0x1000)
        #expect(bus.deviceName(port: 0x80) == "bench-port")
        #expect(bus.mmioDeviceNames.isEmpty)
        #expect(builder.mmioDeviceNames.count == 1)
    }

    @Test func dispatchesMMIOWithOffsets() throws {
        var builder = IOBusBuilder()
        let dev = RecordingMMIO()
        try builder.attach(dev, base: 0xD000_0000, size: 0x1000)
        let bus = builder.freeze()
        let r = bus.mmioRead(0xD000_0010, size: 4)
        #expect(r.value == 0x1010)
        #expect(r.range == 0xD000_0000)
        #expect(bus.mmioWrite(0xD000_0FF8, size: 8, value: 7) == 0xD000_0000)
        #expect(dev.lastWrite.withLock { $0 }! == (0xFF8, 8, 7))
        #expect(bus.mmioWrite(0xD000_1000, size: 1, value: 0) == nil)
    }
}

@Suite struct UARTTests {
    @Test func inputIsReadThroughRBRWithDataReady() {
        let uart = UART16550(output: { _ in })
        #expect(uart.portRead(offset: 5, size: 1) & 1 == 0)
        uart.enqueueInput(Array("hi".utf8))
        #expect(uart.portRead(offset: 5, size: 1) & 1 == 1)
        #expect(uart.portRead(offset: 0, size: 1) == UInt32(UInt8(ascii: "h")))
        #expect(uart.portRead(offset: 0, size: 1) == UInt32(UInt8(ascii: "i")))
        #expect(uart.portRead(offset: 5, size: 1) & 1 == 0)
        #expect(uart.pendingInputCount == 0)
    }

    @Test func divisorLatchAndScratchBehaveLikeA16550() {
        let sink = SerialCapture()
        let uart = UART16550(output: sink.append)
        uart.portWrite(offset: 3, size: 1, value: 0x80)  // DLAB
        uart.portWrite(offset: 0, size: 1, value: 0x01)  // DLL, not output
        uart.portWrite(offset: 1, size: 1, value: 0x00)
        #expect(uart.portRead(offset: 0, size: 1) == 1)
        uart.portWrite(offset: 3, size: 1, value: 0x03)
        uart.portWrite(offset: 7, size: 1, value: 0x5A)
        #expect(uart.portRead(offset: 7, size: 1) == 0x5A)
        #expect(sink.text.isEmpty)
        uart.portWrite(offset: 2, size: 1, value: 0x01)  // FIFO on
        #expect(uart.portRead(offset: 2, size: 1) & 0xC0 == 0xC0)
    }

    @Test func loopbackReturnsWrittenBytesAndRaisesInterrupts() {
        let sink = SerialCapture()
        let irq = Mutex<[Bool]>([])
        let uart = UART16550(output: sink.append, irqLine: { v in irq.withLock { $0.append(v) } })
        uart.portWrite(offset: 4, size: 1, value: 0x10)  // loopback
        uart.portWrite(offset: 1, size: 1, value: 0x01)  // IER: receive data
        uart.portWrite(offset: 0, size: 1, value: 0x42)
        #expect(sink.text.isEmpty)
        #expect(uart.portRead(offset: 2, size: 1) & 0x0F == 0x04)  // IIR: received data
        #expect(irq.withLock { $0.last } == true)
        #expect(uart.portRead(offset: 0, size: 1) == 0x42)
        #expect(irq.withLock { $0.last } == false)
        #expect(uart.portRead(offset: 2, size: 1) & 0x0F == 0x01)  // nothing pending
    }

    @Test func exitPortReportsTheLowByte() {
        let got = Mutex<UInt8?>(nil)
        let port = ExitPort { v in got.withLock { $0 = v } }
        port.portWrite(offset: 0, size: 4, value: 0x1_2345)
        #expect(got.withLock { $0 } == 0x45)
    }
}
