import Testing
@testable import VirtCore

@Suite struct GuestMemoryDiscardTests {
    @Test func discardedPagesReadZeroAndLeaveTheHost() throws {
        let m = try GuestMemory(size: 4 << 20)
        try m.fill(0xAB, at: 0, count: 4 << 20)
        let before = m.allocatedBytes
        #expect(before >= 4 << 20)
        try m.discard(gpa: 1 << 20, length: 2 << 20)
        #expect(m.allocatedBytes <= before - (2 << 20))
        #expect(try m.load(UInt64.self, at: 1 << 20) == 0)
        #expect(try m.load(UInt8.self, at: (1 << 20) - 1) == 0xAB)  // neighbours keep their data
        #expect(try m.load(UInt8.self, at: 3 << 20) == 0xAB)
    }

    @Test func discardChecksAlignmentAndBounds() throws {
        let m = try GuestMemory(size: 1 << 20)
        #expect(throws: GuestMemoryError.self) { try m.discard(gpa: 100, length: 4096) }
        #expect(throws: GuestMemoryError.self) { try m.discard(gpa: 0, length: 2 << 20) }
    }

    @Test func preallocationBacksEveryPageAndLeavesThemZero() throws {
        let m = try GuestMemory(size: 8 << 20)
        #expect(m.allocatedBytes == 0, "a fresh memfd holds no pages")
        try m.preallocate()
        #expect(m.allocatedBytes == 8 << 20)
        try m.withBytes(at: 0, count: 8 << 20) { bytes in #expect(!bytes.contains { $0 != 0 }) }
    }
}
