#if canImport(Glibc)
import Glibc
#endif
import Testing
@testable import VirtCore

@Suite struct GuestMemoryTests {
    @Test func storesAndLoadsLittleEndian() throws {
        let m = try GuestMemory(size: 1 << 20)
        try m.store(UInt32(0x1122_3344), at: 0x100)
        #expect(try m.load(UInt8.self, at: 0x100) == 0x44)
        #expect(try m.load(UInt32.self, at: 0x100) == 0x1122_3344)
        try m.write([1, 2, 3], at: 0xFFFFD)
        #expect(try m.read(at: 0xFFFFD, count: 3) == [1, 2, 3])
    }

    @Test func rejectsAccessOutsideRAM() throws {
        let m = try GuestMemory(size: 1 << 20)
        #expect(throws: GuestMemoryError.outOfRange(gpa: 0xFFFFE, length: 4, ramSize: 1 << 20)) {
            try m.store(UInt32(1), at: 0xFFFFE)
        }
        #expect(throws: GuestMemoryError.self) { _ = try m.load(UInt64.self, at: UInt64.max - 3) }
        #expect(throws: GuestMemoryError.self) { try m.write([1], at: 1 << 20) }
        #expect(m.contains(0, length: 1 << 20))
        #expect(!m.contains(1, length: 1 << 20))
    }

    @Test func rejectsBadSizes() {
        #expect(throws: GuestMemoryError.invalidSize(0)) { _ = try GuestMemory(size: 0) }
        #expect(throws: GuestMemoryError.invalidSize(4097)) { _ = try GuestMemory(size: 4097) }
    }

    @Test func isBackedByTheMemfd() throws {
        let m = try GuestMemory(size: 64 << 10)
        try m.store(UInt64(0xDEAD_BEEF), at: 8192)
        var word: UInt64 = 0
        let n = pread(m.fileDescriptor, &word, 8, 8192)
        #expect(n == 8)
        #expect(word == 0xDEAD_BEEF)
    }

    @Test func contentHashSeesEveryChange() throws {
        let m = try GuestMemory(size: 64 << 10)
        let h0 = m.contentHash()
        try m.store(UInt8(1), at: 65535)
        #expect(m.contentHash() != h0)
        try m.store(UInt8(0), at: 65535)
        #expect(m.contentHash() == h0)
    }
}

@Suite struct DirtyBitmapTests {
    @Test func setsCountsAndListsPages() {
        var b = DirtyBitmap(pageCount: 130)
        #expect(b.isEmpty)
        b[0] = true; b[64] = true; b[129] = true
        #expect(b.dirtyCount == 3)
        #expect(b.dirtyPages == [0, 64, 129])
        b[64] = false
        #expect(b.dirtyPages == [0, 129])
        var c = DirtyBitmap(pageCount: 130)
        c[5] = true
        b.formUnion(c)
        #expect(b.dirtyPages == [0, 5, 129])
        b.clearAll()
        #expect(b.isEmpty)
    }
}

@Suite struct ExitStatisticsTests {
    @Test func countsPerReasonPortAndRange() {
        var s = ExitStatistics()
        s.record(.portIO, nanoseconds: 100)
        s.recordPort(0x3F8, nanoseconds: 100)
        s.record(.portIO, nanoseconds: 300)
        s.recordPort(0x80, nanoseconds: 300)
        s.record(.mmio, nanoseconds: 50)
        s.recordMMIO(rangeBase: 0xD000_0000, nanoseconds: 50)
        #expect(s[.portIO] == ExitCounter(count: 2, nanoseconds: 400))
        #expect(s.ports[0x80]?.count == 1)
        #expect(s.totalExits == 3)

        var t = ExitStatistics()
        t.record(.portIO, nanoseconds: 1)
        t.recordPort(0x80, nanoseconds: 1)
        s.merge(t)
        #expect(s[.portIO].count == 3)
        #expect(s.ports[0x80] == ExitCounter(count: 2, nanoseconds: 301))

        let table = s.table(portName: { $0 == 0x80 ? "bench-port" : "" })
        #expect(table.contains("port 0x80 (bench-port)"))
        #expect(table.contains("mmio 0xd0000000"))
        #expect(s.report.reasons["io"] == ExitCounter(count: 3, nanoseconds: 401))
        #expect(s.report.total == 4)
        #expect(s.report.ports["0x80"] == ExitCounter(count: 2, nanoseconds: 301))
    }

    @Test func portCountsSurviveAlternatingPorts() {
        var s = ExitStatistics()
        for port: UInt16 in [0x80, 0x80, 0x3F8, 0x80, 0x3FD, 0x3FD] { s.recordPort(port, nanoseconds: 10) }
        #expect(s.ports == [0x80: ExitCounter(count: 3, nanoseconds: 30), 0x3F8: ExitCounter(count: 1, nanoseconds: 10),
                            0x3FD: ExitCounter(count: 2, nanoseconds: 20)])
        var t = ExitStatistics()
        t.recordPort(0x3FD, nanoseconds: 5)
        t.merge(s)
        #expect(t.ports[0x3FD] == ExitCounter(count: 3, nanoseconds: 25))
        t.recordPort(0x3FD, nanoseconds: 1)
        #expect(t.ports[0x3FD]?.count == 4)
        #expect(t.ports.count == 3)
    }

    @Test func hostClockTicksConvertToNanoseconds() {
        #expect(HostClock.nanosecondsPerTick > 0)
        let a = HostClock.ticks()
        let b = HostClock.ticks()
        #expect(b >= a)
    }

    @Test func formatsDurations() {
        #expect(ExitStatistics.formatNanoseconds(1500) == "1.50 µs")
        #expect(ExitStatistics.formatNanoseconds(2_000_000_000) == "2.00 s")
        #expect(ExitStatistics.formatNanoseconds(12) == "12.00 ns")
    }
}

@Suite struct PageTableWalkerTests {
    @Test func translatesThroughFourLevelsAndLargePages() throws {
        let m = try GuestMemory(size: 4 << 20)
        // PML4 at 0x1000 → PDPT 0x2000 → PD 0x3000; PD[0] → PT 0x4000; PD[1] = 2 MiB page.
        try m.store(UInt64(0x2003), at: 0x1000)
        try m.store(UInt64(0x3003), at: 0x2000)
        try m.store(UInt64(0x4003), at: 0x3000)
        try m.store(UInt64(0x20_0083), at: 0x3008)
        try m.store(UInt64(0x9003), at: 0x4000 + 5 * 8)  // 0x5000 → 0x9000
        #expect(PageTableWalker.translate(0x5123, cr3: 0x1000, memory: m) == 0x9123)
        #expect(PageTableWalker.translate(0x20_1234, cr3: 0x1000, memory: m) == 0x20_1234)
        #expect(PageTableWalker.translate(0x6000, cr3: 0x1000, memory: m) == nil)
        try m.write([0x90, 0x0F, 0x0B], at: 0x9FFD)
        // Crossing into an unmapped page stops the read.
        #expect(PageTableWalker.readVirtual(0x5FFD, count: 5, cr3: 0x1000, memory: m) == [0x90, 0x0F, 0x0B])
    }
}
