import TestSupport
import Testing
import VirtCore
@testable import Devices

/// A queue of 8 at fixed addresses in 1 MiB of RAM, as the tests' starting point.
struct VirtioQueueFixture {
    let memory: GuestMemory
    var queue: VirtioQueue
    static let desc: UInt64 = 0x1000, avail: UInt64 = 0x2000, used: UInt64 = 0x3000

    init() throws {
        memory = try GuestMemory(size: 1 << 20)
        queue = VirtioQueue(maxSize: 8)
        try queue.trySetAddress(.descriptorTable, Self.desc, checkAlignment: false)
        try queue.trySetAddress(.availableRing, Self.avail, checkAlignment: false)
        try queue.trySetAddress(.usedRing, Self.used, checkAlignment: false)
        try queue.enable(in: memory)
    }

    func descriptor(_ i: UInt16, _ address: UInt64, _ length: UInt32, _ flags: UInt16 = 0, next: UInt16 = 0) throws {
        let e = Self.desc + 16 * UInt64(i)
        try memory.store(address, at: e)
        try memory.store(length, at: e + 8)
        try memory.store(flags, at: e + 12)
        try memory.store(next, at: e + 14)
    }

    func offer(_ heads: [UInt16], idx: UInt16? = nil) throws {
        for (i, h) in heads.enumerated() { try memory.store(h, at: Self.avail + 4 + 2 * UInt64(i)) }
        try memory.store(idx ?? UInt16(heads.count), at: Self.avail + 2)
    }
}

/// The split virtqueue on its own.
@Suite struct VirtioQueueTests {
    static let N = VirtqDescriptorFlag.next, W = VirtqDescriptorFlag.write

    @Test func validChainIsSplitIntoReadableThenWritable() throws {
        var f = try VirtioQueueFixture()
        try f.descriptor(3, 0x8000, 16, Self.N, next: 5)
        try f.descriptor(5, 0x9000, 512, Self.N, next: 1)
        try f.descriptor(1, 0xA000, 1, Self.W)
        try f.offer([3])
        let chain = try #require(try f.queue.popAvailable(from: f.memory))
        #expect(chain.head == 3)
        #expect(chain.readable == [GuestBuffer(address: 0x8000, length: 16), GuestBuffer(address: 0x9000, length: 512)])
        #expect(chain.writable == [GuestBuffer(address: 0xA000, length: 1)])
        #expect(chain.readableLength == 528 && chain.writableLength == 1)
        #expect(try f.queue.popAvailable(from: f.memory) == nil)

        try f.queue.addUsed(head: 3, length: 1, in: f.memory)
        #expect(try f.memory.load(UInt16.self, at: VirtioQueueFixture.used + 2) == 1)
        #expect(try f.memory.load(UInt32.self, at: VirtioQueueFixture.used + 4) == 3)
        #expect(try f.memory.load(UInt32.self, at: VirtioQueueFixture.used + 8) == 1)
        let first = f.queue.takeInterruptRequest(in: f.memory)
        let second = f.queue.takeInterruptRequest(in: f.memory)
        #expect(first && !second)
    }

    @Test func gatherAndScatterCrossBufferBoundaries() throws {
        var f = try VirtioQueueFixture()
        try f.memory.write(Array("hello ".utf8), at: 0x8000)
        try f.memory.write(Array("world".utf8), at: 0x9000)
        try f.descriptor(0, 0x8000, 6, Self.N, next: 1)
        try f.descriptor(1, 0x9000, 5, Self.N, next: 2)
        try f.descriptor(2, 0xA000, 3, Self.W | Self.N, next: 3)
        try f.descriptor(3, 0xB000, 10, Self.W)
        try f.offer([0])
        let chain = try #require(try f.queue.popAvailable(from: f.memory))
        #expect(try chain.readableBytes(in: f.memory) == Array("hello world".utf8))
        #expect(try chain.readableBytes(in: f.memory, offset: 4, count: 4) == Array("o wo".utf8))
        #expect(try chain.writeWritable(Array("abcdefghijklmnop".utf8), in: f.memory) == 13)
        #expect(try f.memory.read(at: 0xA000, count: 3) == Array("abc".utf8))
        #expect(try f.memory.read(at: 0xB000, count: 10) == Array("defghijklm".utf8))
        #expect(GuestBuffer.segments(of: chain.writable, offset: 2, count: 3)
            == [GuestBuffer(address: 0xA002, length: 1), GuestBuffer(address: 0xB000, length: 2)])
        #expect(GuestBuffer.segments(of: chain.writable, offset: 20, count: 3) == [])
    }

    @Test func descriptorLoopIsDetected() throws {
        var f = try VirtioQueueFixture()
        try f.descriptor(0, 0x8000, 1, Self.N, next: 1)
        try f.descriptor(1, 0x8000, 1, Self.N, next: 0)
        try f.offer([0])
        #expect(throws: VirtqueueError.descriptorLoop(head: 0, size: 8)) { try f.queue.popAvailable(from: f.memory) }
    }

    @Test func selfLinkIsALoop() throws {
        var f = try VirtioQueueFixture()
        try f.descriptor(4, 0x8000, 1, Self.N, next: 4)
        try f.offer([4])
        #expect(throws: VirtqueueError.descriptorLoop(head: 4, size: 8)) { try f.queue.popAvailable(from: f.memory) }
    }

    @Test func nextAndHeadIndicesAreBoundsChecked() throws {
        var f = try VirtioQueueFixture()
        try f.descriptor(0, 0x8000, 1, Self.N, next: 8)
        try f.offer([0, 9])
        #expect(throws: VirtqueueError.nextOutOfRange(head: 0, index: 0, next: 8, size: 8)) { try f.queue.popAvailable(from: f.memory) }
        #expect(throws: VirtqueueError.headOutOfRange(head: 9, size: 8)) { try f.queue.popAvailable(from: f.memory) }
    }

    @Test func buffersOutsideRAMFailOnlyThatRequest() throws {
        var f = try VirtioQueueFixture()
        try f.descriptor(0, 0xFFFF_F000, 16, Self.N, next: 1)
        try f.descriptor(1, 0xC000, 1, Self.W)
        try f.descriptor(2, (1 << 20) - 4, 8)  // straddles the end of RAM
        try f.descriptor(3, UInt64.max - 2, 16)  // would wrap around
        try f.descriptor(4, 0x8000, 4)
        try f.offer([0, 2, 3, 4])
        #expect(throws: VirtqueueError.badRequest(head: 0, .bufferOutsideMemory(GuestBuffer(address: 0xFFFF_F000, length: 16)),
                                                  lastWritable: GuestBuffer(address: 0xC000, length: 1))) {
            try f.queue.popAvailable(from: f.memory)
        }
        #expect(throws: VirtqueueError.badRequest(head: 2, .bufferOutsideMemory(GuestBuffer(address: (1 << 20) - 4, length: 8)),
                                                  lastWritable: nil)) {
            try f.queue.popAvailable(from: f.memory)
        }
        #expect(throws: VirtqueueError.self) { try f.queue.popAvailable(from: f.memory) }
        // The queue carries on with the next request.
        #expect(try f.queue.popAvailable(from: f.memory)?.head == 4)
    }

    @Test func oversizedChainsAreRefused() throws {
        var f = try VirtioQueueFixture()
        f.queue.maxChainBytes = 1 << 20
        try f.descriptor(0, 0, 0x8_0000, Self.N, next: 1)
        try f.descriptor(1, 0, 0x8_0000, Self.N, next: 2)
        try f.descriptor(2, 0, 1, Self.W)
        try f.offer([0])
        #expect(throws: VirtqueueError.badRequest(head: 0, .tooLarge(bytes: 0x10_0001, limit: 1 << 20),
                                                  lastWritable: GuestBuffer(address: 0, length: 1))) {
            try f.queue.popAvailable(from: f.memory)
        }
        // A length beyond RAM is refused as outside f.memory whatever the limit.
        try f.descriptor(3, 0x8000, UInt32.max)
        try f.offer([0, 3], idx: 2)
        #expect(throws: VirtqueueError.self) { try f.queue.popAvailable(from: f.memory) }
    }

    @Test func readableAfterWritableIsRefused() throws {
        var f = try VirtioQueueFixture()
        try f.descriptor(0, 0x8000, 4, Self.W | Self.N, next: 1)
        try f.descriptor(1, 0x9000, 4)
        try f.offer([0])
        #expect(throws: VirtqueueError.badRequest(head: 0, .writableBeforeReadable(index: 1), lastWritable: nil)) {
            try f.queue.popAvailable(from: f.memory)
        }
    }

    @Test func indirectDescriptorsAreNotAccepted() throws {
        var f = try VirtioQueueFixture()
        try f.descriptor(0, 0x8000, 32, VirtqDescriptorFlag.indirect)
        try f.offer([0])
        #expect(throws: VirtqueueError.indirectDescriptor(head: 0, index: 0)) { try f.queue.popAvailable(from: f.memory) }
    }

    @Test func availIndexMovingByMoreThanTheQueueSizeIsAnError() throws {
        var f = try VirtioQueueFixture()
        try f.descriptor(0, 0x8000, 1)
        try f.offer([0], idx: 9)
        #expect(throws: VirtqueueError.availIndexJump(previous: 0, current: 9, size: 8)) { try f.queue.popAvailable(from: f.memory) }
        // Wrapping around 65535 → 0 is fine.
        try f.offer([0], idx: 8)
        for _ in 0..<8 { _ = try f.queue.popAvailable(from: f.memory) }
        #expect(f.queue.lastAvailIndex == 8)
    }

    @Test func nextChainCompletesBadRequestsAndContinues() throws {
        var f = try VirtioQueueFixture()
        try f.descriptor(0, 0xFFFF_0000_0000, 4, Self.N, next: 1)
        try f.descriptor(1, 0xC000, 2, Self.W)
        try f.descriptor(2, 0x8000, 4)
        try f.offer([0, 2])
        let diagnostics = VirtioDiagnostics(deviceName: "test", log: { _ in })
        var failed: GuestBuffer?
        let chain = try f.queue.nextChain(from: f.memory, diagnostics: diagnostics) { last in
            failed = last
            return 1
        }
        #expect(chain?.head == 2)
        #expect(failed == GuestBuffer(address: 0xC000, length: 2))
        #expect(diagnostics.count(of: "bufferOutsideMemory") == 1)
        #expect(try f.memory.load(UInt16.self, at: VirtioQueueFixture.used + 2) == 1)
        #expect(try f.memory.load(UInt32.self, at: VirtioQueueFixture.used + 4) == 0)
        #expect(try f.memory.load(UInt32.self, at: VirtioQueueFixture.used + 8) == 1)
    }

    @Test func layoutIsValidatedBeforeTheQueueIsReady() throws {
        let f = try VirtioQueueFixture()
        var q = VirtioQueue(maxSize: 256)
        try q.trySetAddress(.descriptorTable, 0x1008, checkAlignment: false)
        #expect(throws: VirtqueueError.misaligned(.descriptorTable, address: 0x1008)) { try q.enable(in: f.memory) }
        try q.trySetAddress(.descriptorTable, (1 << 20) - 0x800, checkAlignment: false)
        #expect(throws: VirtqueueError.ringOutsideMemory(.descriptorTable, address: (1 << 20) - 0x800, length: 4096)) {
            try q.enable(in: f.memory)
        }
        try q.trySetAddress(.descriptorTable, 0, checkAlignment: false)
        try q.trySetAddress(.availableRing, 0x1001, checkAlignment: false)
        #expect(throws: VirtqueueError.misaligned(.availableRing, address: 0x1001)) { try q.enable(in: f.memory) }
        try q.trySetAddress(.availableRing, 0x2000, checkAlignment: false)
        try q.trySetAddress(.usedRing, UInt64.max - 3, checkAlignment: false)
        #expect(throws: VirtqueueError.self) { try q.enable(in: f.memory) }
        try q.trySetAddress(.usedRing, 0x3000, checkAlignment: false)
        #expect(throws: VirtqueueError.invalidSize(100, max: 256)) { try q.trySetSize(100) }
        #expect(throws: VirtqueueError.invalidSize(512, max: 256)) { try q.trySetSize(512) }
        #expect(q.size == 256)  // a refused size leaves the queue as it was
        try q.trySetSize(128)
        try q.enable(in: f.memory)
        #expect(q.isReady)
        // A ready queue's geometry is fixed; alignment is checked when asked for.
        #expect(throws: VirtqueueError.changedWhileReady) { try q.trySetSize(64) }
        #expect(throws: VirtqueueError.changedWhileReady) { try q.trySetAddress(.usedRing, 0x4000) }
        q.disable()
        #expect(throws: VirtqueueError.misaligned(.usedRing, address: 0x4002)) { try q.trySetAddress(.usedRing, 0x4002) }
        #expect(q.usedRing == 0x3000)
    }

    @Test func noInterruptFlagSuppressesTheInterruptRequest() throws {
        var f = try VirtioQueueFixture()
        try f.descriptor(0, 0x8000, 1)
        try f.offer([0])
        try f.memory.store(UInt16(1), at: VirtioQueueFixture.avail)  // VIRTQ_AVAIL_F_NO_INTERRUPT
        let chain = try #require(try f.queue.popAvailable(from: f.memory))
        try f.queue.addUsed(head: chain.head, length: 0, in: f.memory)
        let wanted = f.queue.takeInterruptRequest(in: f.memory)
        #expect(!wanted)
        #expect(throws: VirtqueueError.usedHeadOutOfRange(head: 8, size: 8)) { try f.queue.addUsed(head: 8, length: 0, in: f.memory) }
    }
}

/// Random bytes as descriptor table and rings: the queue must only ever return chains that
/// satisfy its guarantees, or typed errors.
@Suite struct VirtioQueueFuzzTests {
    @Test func randomRingsYieldValidChainsOrTypedErrors() throws {
        let ram: UInt64 = 64 << 10
        let memory = try GuestMemory(size: ram)
        var rng = SplitMix64(seed: FuzzBudget.seed(0x5EED_0F_F1CE))
        var outcomes: [String: Int] = [:]
        for iteration in 0..<FuzzBudget.iterations(standard: 6000) {
            let size = UInt16(1) << UInt16.random(in: 0...7, using: &rng)
            var q = VirtioQueue(maxSize: 128, maxChainBytes: [64 << 20, 4096, 100][iteration % 3])
            try q.trySetSize(size)
            try q.trySetAddress(.descriptorTable, 0, checkAlignment: false)
            try q.trySetAddress(.availableRing, 0x1000, checkAlignment: false)
            try q.trySetAddress(.usedRing, 0x2000, checkAlignment: false)
            try q.enable(in: memory)

            // Half the iterations are raw noise; the rest are "plausible" descriptors with
            // small addresses and lengths so that valid chains and subtle faults occur too.
            var noise = (0..<0x1200).map { _ in UInt8.random(in: 0...255, using: &rng) }
            if iteration % 2 == 1 {
                for i in 0..<Int(size) {
                    let e = 16 * i
                    let address = UInt64.random(in: 0..<(ram + 0x1000), using: &rng)
                    let length = UInt32.random(in: 0...0x2000, using: &rng)
                    var flags = UInt16.random(in: 0...7, using: &rng)
                    if Int.random(in: 0..<8, using: &rng) != 0 { flags &= ~VirtqDescriptorFlag.indirect }
                    let next = UInt16.random(in: 0..<(size + 2), using: &rng)
                    withUnsafeBytes(of: address.littleEndian) { noise.replaceSubrange(e..<e + 8, with: $0) }
                    withUnsafeBytes(of: length.littleEndian) { noise.replaceSubrange(e + 8..<e + 12, with: $0) }
                    withUnsafeBytes(of: flags.littleEndian) { noise.replaceSubrange(e + 12..<e + 14, with: $0) }
                    withUnsafeBytes(of: next.littleEndian) { noise.replaceSubrange(e + 14..<e + 16, with: $0) }
                }
                // avail idx small, heads mostly in range
                noise[0x1002] = UInt8.random(in: 0...UInt8(min(255, Int(size) + 2)), using: &rng)
                noise[0x1003] = 0
                for i in 0..<Int(size) {
                    noise[0x1004 + 2 * i] = UInt8.random(in: 0...UInt8(min(255, Int(size))), using: &rng)
                    noise[0x1005 + 2 * i] = 0
                }
            }
            try memory.write(noise, at: 0)

            for _ in 0..<Int(size) + 1 {
                let popped: DescriptorChain?
                do {
                    popped = try q.popAvailable(from: memory)
                } catch {
                    outcomes[error.kind, default: 0] += 1
                    guard case let .badRequest(head, _, last) = error else { break }
                    if let last { #expect(memory.contains(last.address, length: last.length) && last.length > 0) }
                    try q.addUsed(head: head, length: 0, in: memory)
                    continue
                }
                guard let chain = popped else {
                    outcomes["empty", default: 0] += 1
                    break
                }
                outcomes["valid", default: 0] += 1
                #expect(chain.head < size)
                #expect(chain.readable.count + chain.writable.count <= Int(size))
                #expect(chain.readableLength + chain.writableLength <= q.maxChainBytes)
                for b in chain.readable + chain.writable { #expect(memory.contains(b.address, length: b.length)) }
                _ = try chain.readableBytes(in: memory)
                try q.addUsed(head: chain.head, length: UInt32(chain.writableLength), in: memory)
            }
        }
        // The generator reached every interesting outcome.
        for kind in ["valid", "descriptorLoop", "nextOutOfRange", "headOutOfRange", "availIndexJump",
                     "indirectDescriptor", "bufferOutsideMemory", "chainTooLarge", "writableBeforeReadable"] {
            #expect(outcomes[kind, default: 0] > 0, "no \(kind) outcome in \(outcomes)")
        }
    }
}
