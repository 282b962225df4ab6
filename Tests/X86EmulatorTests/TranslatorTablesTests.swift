import TestSupport
import Testing
@testable import X86Emulator

/// The translator's bookkeeping tables, against the obvious implementations.
@Suite struct TranslatorTablesTests {
    /// Random inserts, replacements and lookups (clustered and spread addresses, growth past
    /// the initial capacity, then `removeAll`) give what a Dictionary gives.
    @Test func blockTableMatchesADictionary() {
        var rng = SplitMix64(seed: 0x5EED_B10C)
        var table = BlockTable(capacity: 8)
        defer { table.deallocate() }
        var reference: [UInt64: BlockTranslator.Block] = [:]
        for round in 0..<2 {
            for step in 0..<20_000 {
                // Half the addresses within a few pages (blocks of one hot page), half anywhere in 4 GiB.
                let gpa = step % 2 == 0 ? 0x10_0000 + UInt64.random(in: 0..<0x3000, using: &rng) : UInt64.random(in: 0..<(1 << 32), using: &rng)
                if Bool.random(using: &rng) {
                    let block = BlockTranslator.Block(rip: rng.next(), gen: UInt32.random(in: 0...9, using: &rng),
                                                      entry: Int.random(in: -1..<1 << 20, using: &rng), chainedEntry: step)
                    table[gpa] = block
                    reference[gpa] = block
                } else {
                    #expect(table[gpa]?.rip == reference[gpa]?.rip && table[gpa]?.chainedEntry == reference[gpa]?.chainedEntry)
                }
            }
            #expect(table.count == reference.count)
            for (gpa, block) in reference { #expect(table[gpa]?.rip == block.rip && table[gpa]?.entry == block.entry) }
            if round == 0 {
                table.removeAll()
                #expect(table.count == 0 && reference.keys.allSatisfy { table[$0] == nil })
                reference.removeAll()
            }
        }
    }

    /// The fill log lists what was noted until it holds `capacity`; one more fill makes the
    /// next flush a full one, and a flush starts a new list.
    @Test func fillLogListsFillsUntilItOverflows() {
        var log = TranslatorFillLog()
        defer { log.deallocate() }
        #expect(log.overflowed, "a new CPU's tables are unknown: its first flush is a full one")
        log.reset()
        log.note(.tlb, 1023)
        log.note(.jumpCache, 4095)
        log.note(.interpreted, 7)
        var seen: [String] = []
        log.forEach { table, index in seen.append("\(table)\(index)") }
        #expect(seen == ["tlb1023", "jumpCache4095", "interpreted7"])
        for k in 0..<(TranslatorFillLog.capacity - 3) { log.note(.tlb, k) }
        #expect(!log.overflowed && log.count == TranslatorFillLog.capacity)
        log.note(.tlb, 0)
        #expect(log.overflowed)
        log.reset()
        #expect(!log.overflowed && log.count == 0)
    }
}
