import Foundation
import GuestImages
import TestSupport
import Testing
import VirtCore
@testable import VMM

@Suite struct DeduplicationTests {
    func idleMachine(_ engine: EngineChoice) throws -> Machine {
        let guest = try #require(BundledGuests.named("hello"))
        return try Machine(image: try ELFImage(bytes: guest.elf), configuration: MachineConfiguration(memorySize: 16 << 20),
                           engine: try TestEngines.make(engine), serialOutput: { _ in })
    }

    @Test(arguments: TestEngines.available)
    func identicalPagesAcrossVMsShareOneHostPageUntilWritten(engine: EngineChoice) throws {
        let a = try idleMachine(engine), b = try idleMachine(engine)
        let pages = 0x800..<0x840  // 64 pages at 8 MiB, identical in both VMs
        for m in [a, b] { for p in pages { try m.memory.fill(0xC3, at: UInt64(p) * 4096, count: 4096) } }
        try a.memory.store(UInt64(0x1234), at: 0x83F * 4096)  // one page differs
        let before = (a.memory.allocatedBytes, b.memory.allocatedBytes)
        let dedup = try PageDeduplicator(machines: [a, b])
        let groups = dedup.findDuplicates(in: pages)
        #expect(groups.count == 1)
        #expect(groups[0].count == 127)
        #expect(try dedup.merge(groups) == 127)
        #expect(a.memory.allocatedBytes <= before.0 - 63 * 4096)  // their memfd pages are freed
        #expect(b.memory.allocatedBytes <= before.1 - 64 * 4096)
        #expect(dedup.statistics.pagesSavedNow == 126)
        #expect(try b.memory.load(UInt64.self, at: 0x820 * 4096) == 0xC3C3_C3C3_C3C3_C3C3)
        // A write breaks sharing for that page only.
        try a.memory.store(UInt64(7), at: 0x800 * 4096)
        #expect(dedup.statistics.breaks == 1)
        #expect(try a.memory.load(UInt64.self, at: 0x800 * 4096) == 7)
        #expect(try b.memory.load(UInt64.self, at: 0x800 * 4096) == 0xC3C3_C3C3_C3C3_C3C3)
        #expect(try a.memory.load(UInt64.self, at: 0x801 * 4096) == 0xC3C3_C3C3_C3C3_C3C3)
    }

    @Test func policyBreakEvenMatchesItsModel() {
        let policy = DeduplicationPolicy(breakCostPageRounds: 16, rounds: 32)
        let p = policy.breakEvenWriteProbability
        #expect(abs(policy.expected(writeProbability: p).benefit) < 1e-6)
        #expect(policy.expected(writeProbability: p / 2).benefit > 0)
        #expect(policy.expected(writeProbability: p * 2).benefit < 0)
        #expect(DeduplicationPolicy(breakCostPageRounds: 0).breakEvenWriteProbability == 1)  // free breaks: always merge
    }
}
