import TestSupport
import Testing
import VirtCore
@testable import Devices
#if canImport(Glibc)
import Glibc
#endif

/// Seeded fuzzing of descriptor chains through the whole stack (registers, queue, block
/// device): a valid read request whose descriptors, ring entries or header are then
/// overwritten with boundary values. Whatever the damage, the device writes guest RAM only
/// inside buffers the driver marked device-writable (and the used ring), and the request
/// either completes (failed, when its chain was broken) or the queue stops with a reset.
@Suite struct VirtqueueChainFuzzTests {
    static let ramSize: UInt64 = 2 << 20
    static let queueSize: UInt16 = 8
    static let sectors = 16

    /// The device-writable ranges the descriptor table names now, plus the used ring.
    static func writableRanges(_ g: VirtioTestGuest) throws -> [Range<UInt64>] {
        let ring = try #require(g.rings[0])
        var ranges = [ring.used..<ring.used + 6 + 8 * UInt64(ring.size)]
        for i in 0..<UInt64(ring.size) {
            let entry = ring.desc + 16 * i
            let address: UInt64 = try g.memory.load(at: entry)
            let length: UInt32 = try g.memory.load(at: entry + 8)
            let flags: UInt16 = try g.memory.load(at: entry + 12)
            if flags & VirtqDescriptorFlag.write != 0 {
                let (end, overflow) = address.addingReportingOverflow(UInt64(length))
                ranges.append(address..<(overflow ? .max : end))
            }
        }
        return ranges
    }

    /// Overwrites one field of descriptor `index` with a boundary (or random) value.
    static func overwriteDescriptorField(_ g: VirtioTestGuest, index: UInt16, _ rng: inout SplitMix64) throws {
        let entry = g.rings[0]!.desc + 16 * UInt64(index)
        let value = Mutation.boundaryValue(&rng)
        switch rng.next() % 4 {
        case 0: try g.memory.store(value, at: entry)
        case 1: try g.memory.store(UInt32(truncatingIfNeeded: value), at: entry + 8)
        case 2: try g.memory.store(UInt16(truncatingIfNeeded: rng.next() % 8), at: entry + 12)  // NEXT, WRITE, INDIRECT
        default: try g.memory.store(UInt16(truncatingIfNeeded: rng.next() % 2 == 0 ? value : rng.next() % 10), at: entry + 14)
        }
    }

    @Test func brokenChainsFailTheRequestOrStopTheQueueAndWriteOnlyWritableBuffers() throws {
        let file = VirtioTempFile(size: Self.sectors * 512) { UInt8(truncatingIfNeeded: $0 / 512 + 1) }
        let original = file.contents()
        let blk = try VirtioBlock(path: file.path)
        let g = try VirtioTestGuest(blk, ramSize: Self.ramSize)
        let seed = FuzzBudget.seed(0xC4A1_15)
        var rng = SplitMix64(seed: seed)
        var outcomes: [String: Int] = [:]
        for iteration in 0..<FuzzBudget.iterations(standard: 500) {
            let context = "seed \(seed) iteration \(iteration)"
            g.reset()
            g.start(queues: 1, size: Self.queueSize)
            let sector = rng.next() % 4 == 0 ? Mutation.boundaryValue(&rng) : rng.next() % UInt64(Self.sectors)
            let request = g.post(0, readable: [virtioBlockHeader(BlockType.read, sector: sector)],
                                 writable: [512 * (1 + Int(rng.next() % 2)), 1], publish: false)
            var headerMoved = false
            var head = request.head, idxStep: UInt16 = 1
            for _ in 0..<1 + Int(rng.next() % 3) {
                switch rng.next() % 6 {
                case 0: head = UInt16(truncatingIfNeeded: rng.next() % 2 == 0 ? Mutation.boundaryValue(&rng) : rng.next() % 10)
                case 1: idxStep = UInt16(truncatingIfNeeded: Mutation.boundaryValue(&rng))
                default:
                    let index = UInt16(rng.next() % (rng.next() % 4 == 0 ? UInt64(Self.queueSize) : 3))
                    try Self.overwriteDescriptorField(g, index: index, &rng)
                    headerMoved = headerMoved || index == 0
                }
            }
            g.publish(0, head: head, idxStep: idxStep)
            let allowed = try Self.writableRanges(g)
            let before = try g.memory.read(at: 0, count: Int(Self.ramSize))
            let failedBefore = blk.statistics.failedRequests, faultsBefore = g.transport.diagnostics.errorCount

            g.notify(0)

            // RAM changed only inside device-writable buffers and the used ring.
            let after = try g.memory.read(at: 0, count: Int(Self.ramSize))
            for page in stride(from: 0, to: after.count, by: 4096) {
                let same = before.withUnsafeBytes { b in after.withUnsafeBytes { a in memcmp(a.baseAddress! + page, b.baseAddress! + page, 4096) == 0 } }
                if same { continue }
                for i in page..<page + 4096 where before[i] != after[i] {
                    #expect(allowed.contains { $0.contains(UInt64(i)) }, "wrote 0x\(String(i, radix: 16)), \(context)")
                }
            }
            let faults = g.transport.diagnostics.errorCount - faultsBefore
            let used = g.takeUsed(0)
            if g.status & VirtioStatus.deviceNeedsReset != 0 {
                outcomes["reset", default: 0] += 1
                #expect(faults >= 1, "reset without a recorded fault, \(context)")
            } else {
                // Every published entry completed, the broken ones counted as failed requests.
                outcomes[faults > 0 ? "failed chain" : idxStep == 0 ? "nothing published" : "processed", default: 0] += 1
                #expect(used.count == Int(idxStep), "\(used) for \(idxStep) published, \(context)")
                if idxStep > 0 { #expect(used.first?.id == UInt32(head), "\(used), \(context)") }
                #expect(blk.statistics.failedRequests - failedBefore >= faults, "broken chain not failed, \(context)")
            }
            if !headerMoved { #expect(file.contents() == original, "a read request changed the disk, \(context)") }
        }
        for outcome in ["reset", "failed chain", "processed"] {
            #expect(outcomes[outcome, default: 0] > 0, "no \(outcome) outcome in \(outcomes)")
        }
    }
}
