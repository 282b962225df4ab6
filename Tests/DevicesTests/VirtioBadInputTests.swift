import Synchronization
import TestSupport
import Testing
import VirtCore
@testable import Devices

/// Hostile rings and chains, sent through the whole stack (registers, queue, device).
enum VirtioBadInput: String, CaseIterable, Sendable, CustomStringConvertible {
    case descriptorLoop, bufferOutsideRAM, lengthBeyondRAM, oversizedChain, availIndexJump
    case headOutOfRange, nextOutOfRange, indirectDescriptor, writableBeforeReadable

    var description: String { rawValue }

    /// Ring-level faults: no request can be failed, the device needs a reset.
    var needsReset: Bool {
        switch self {
        case .descriptorLoop, .availIndexJump, .headOutOfRange, .nextOutOfRange, .indirectDescriptor: return true
        case .bufferOutsideRAM, .lengthBeyondRAM, .oversizedChain, .writableBeforeReadable: return false
        }
    }

    var faultKind: String {
        switch self {
        case .descriptorLoop: return "descriptorLoop"
        case .bufferOutsideRAM, .lengthBeyondRAM: return "bufferOutsideMemory"
        case .oversizedChain: return "chainTooLarge"
        case .availIndexJump: return "availIndexJump"
        case .headOutOfRange: return "headOutOfRange"
        case .nextOutOfRange: return "nextOutOfRange"
        case .indirectDescriptor: return "indirectDescriptor"
        case .writableBeforeReadable: return "writableBeforeReadable"
        }
    }

    /// Writes a hostile request into queue `q` (fresh, descriptors from 0): `first` is a
    /// device-readable buffer (e.g. a block header), `status` a 1-byte writable buffer at
    /// the end of the chain where one makes sense. Publishes it.
    func inject(into g: VirtioTestGuest, queue q: Int, first: [UInt8]) -> GuestBuffer {
        let R: UInt16 = 0, W = VirtqDescriptorFlag.write, N = VirtqDescriptorFlag.next
        let head = g.alloc(first.count)
        try! g.memory.write(first, at: head)
        let data = g.alloc(512)
        let status = GuestBuffer(address: g.alloc(1), length: 1)
        try! g.memory.store(UInt8(0xEE), at: status.address)
        let d = { (i: UInt16, a: UInt64, l: UInt32, f: UInt16, n: UInt16) in
            g.writeDescriptor(q, index: i, address: a, length: l, flags: f, next: n)
        }
        let len = UInt32(first.count)
        switch self {
        case .descriptorLoop:
            d(0, head, len, R | N, 1); d(1, data, 512, W | N, 2); d(2, status.address, 1, W | N, 1)
        case .bufferOutsideRAM:
            d(0, head, len, R | N, 1); d(1, 0x1_0000_0000, 512, W | N, 2); d(2, status.address, 1, W, 0)
        case .lengthBeyondRAM:
            d(0, head, len, R | N, 1); d(1, data, 0xFFFF_FFFF, W | N, 2); d(2, status.address, 1, W, 0)
        case .oversizedChain:
            // 25 buffers of 3 MiB, each inside the 4 MiB of RAM: 75 MiB in all.
            d(0, head, len, R | N, 1)
            for i: UInt16 in 1...25 { d(i, 0x10_0000, 3 << 20, W | N, i + 1) }
            d(26, status.address, 1, W, 0)
        case .availIndexJump:
            d(0, head, len, R | N, 1); d(1, status.address, 1, W, 0)
            g.publish(q, head: 0, idxStep: 300)
            return status
        case .headOutOfRange:
            g.publish(q, head: 999)
            return status
        case .nextOutOfRange:
            d(0, head, len, R | N, 4000)
        case .indirectDescriptor:
            d(0, head, 16, VirtqDescriptorFlag.indirect, 0)
        case .writableBeforeReadable:
            d(0, head, len, R | N, 1); d(1, data, 512, W | N, 2); d(2, data, 16, R | N, 3); d(3, status.address, 1, W, 0)
        }
        g.publish(q, head: 0)
        return status
    }
}

@Suite struct VirtioBadInputTests {
    @Test(arguments: VirtioBadInput.allCases)
    func blockDeviceSurvivesAndRecovers(_ input: VirtioBadInput) throws {
        let file = VirtioTempFile(size: 16 * 512) { UInt8(truncatingIfNeeded: $0 / 512 + 1) }
        let blk = try VirtioBlock(path: file.path)
        let g = try VirtioTestGuest(blk)
        g.start(queues: 1)
        let status = input.inject(into: g, queue: 0, first: virtioBlockHeader(BlockType.read, sector: 2))
        g.notify(0)

        #expect(g.transport.diagnostics.count(of: input.faultKind) == 1)
        #expect(g.recorder.logLines.count == 1)
        if input.needsReset {
            #expect(g.status & VirtioStatus.deviceNeedsReset != 0)
            #expect(g.reg(Reg.interruptStatus) & VirtioInterrupt.configurationChange != 0)
            #expect(g.recorder.lineAsserted)
        } else {
            // The request failed on its own: IOERR in its status byte, the rest carries on.
            #expect(g.status & VirtioStatus.deviceNeedsReset == 0)
            #expect(g.takeUsed(0).map(\.length) == [1])
            #expect(g.bytes(status) == [1])
            #expect(blk.statistics.failedRequests == 1)
            let ok = g.post(0, readable: [virtioBlockHeader(BlockType.read, sector: 5)], writable: [512, 1])
            g.notify(0)
            #expect(g.bytes(ok.writable[0]) == [UInt8](repeating: 6, count: 512))
            #expect(g.bytes(ok.writable[1]) == [0])
        }

        // After a reset the device works normally, whatever happened before.
        g.reset()
        g.start(queues: 1)
        let w = g.post(0, readable: [virtioBlockHeader(BlockType.write, sector: 7), [UInt8](repeating: 0x77, count: 512)], writable: [1])
        let r = g.post(0, readable: [virtioBlockHeader(BlockType.read, sector: 7)], writable: [512, 1])
        g.notify(0)
        #expect(g.bytes(w.writable[0]) == [0])
        #expect(g.bytes(r.writable[0]) == [UInt8](repeating: 0x77, count: 512))
        #expect(g.status == VirtioStatus.acknowledge | VirtioStatus.driver | VirtioStatus.featuresOK | VirtioStatus.driverOK)
        #expect(file.contents()[7 * 512] == 0x77)
    }

    @Test(arguments: VirtioBadInput.allCases)
    func consoleSurvivesAndRecovers(_ input: VirtioBadInput) throws {
        let recorder = VirtioRecorder()
        let console = VirtioConsole(output: recorder.sink)
        let g = try VirtioTestGuest(console, recorder: recorder)
        g.start(queues: 2)
        _ = input.inject(into: g, queue: VirtioConsole.transmitQueue, first: Array("bad".utf8))
        g.notify(VirtioConsole.transmitQueue)
        #expect(g.transport.diagnostics.count(of: input.faultKind) == 1)
        #expect((g.status & VirtioStatus.deviceNeedsReset != 0) == input.needsReset)
        if !input.needsReset {
            // Returned to the driver unused; nothing reached the sink.
            #expect(g.takeUsed(VirtioConsole.transmitQueue).map(\.length) == [0])
            #expect(recorder.output.isEmpty)
        }
        g.reset()
        g.start(queues: 2)
        g.post(VirtioConsole.transmitQueue, readable: [Array("fine".utf8)])
        g.notify(VirtioConsole.transmitQueue)
        #expect(recorder.text == "fine")
    }

    /// Random register traffic and random ring contents against each device: the host must
    /// never crash, and a proper initialisation afterwards must give a working device.
    @Test func randomRegisterAndRingTrafficNeverCrashes() throws {
        var rng = SplitMix64(seed: FuzzBudget.seed(0xC0FF_EE15_600D))
        let file = VirtioTempFile(size: 64 * 512)
        let recorder = VirtioRecorder()
        let lan = NetworkSwitch(name: "fuzz")
        let peerSide = try VirtioNetGuest("02:00:00:00:00:99", backend: lan.makePort())
        let peer = peerSide.net
        let makers: [() throws -> any VirtioDevice] = [
            // Random chains can carry megabytes of output: keep only the tail.
            { VirtioConsole(output: { b in recorder.bytes.withLock { $0 = Array(($0 + b).suffix(64)) } }) },
            { try VirtioBlock(path: file.path) },
            { VirtioNet(mac: MACAddress("02:00:00:00:00:01")!, backend: lan.makePort()) },
        ]
        let registers: [UInt64] = [Reg.deviceFeaturesSel, Reg.driverFeatures, Reg.driverFeaturesSel, Reg.queueSel,
                                   Reg.queueNum, Reg.queueReady, Reg.queueNotify, Reg.interruptACK, Reg.status,
                                   Reg.queueDescLow, Reg.queueDescHigh, Reg.queueDriverLow, Reg.queueDriverHigh,
                                   Reg.queueDeviceLow, Reg.queueDeviceHigh]
        for make in makers {
            let device = try make()
            let g = try VirtioTestGuest(device, recorder: VirtioRecorder())
            for round in 0..<FuzzBudget.iterations(standard: 400) {
                if round % 4 == 0 {
                    // A plausible start, so later traffic reaches the queues.
                    g.reset()
                    g.start(queues: device.queueMaxSizes.count, size: [1, 2, 8, 256][Int.random(in: 0...3, using: &rng)])
                }
                for _ in 0..<30 {
                    switch Int.random(in: 0..<10, using: &rng) {
                    case 0..<4:
                        let offset = Bool.random(using: &rng) ? registers.randomElement(using: &rng)! : UInt64.random(in: 0..<0x200, using: &rng)
                        let size = [1, 2, 4, 4, 4, 8].randomElement(using: &rng)!
                        let value = Bool.random(using: &rng) ? UInt64.random(in: 0...300, using: &rng) : rng.next()
                        g.transport.mmioWrite(offset: offset, size: UInt8(size), value: value)
                    case 4..<6:
                        _ = g.transport.mmioRead(offset: UInt64.random(in: 0..<0x200, using: &rng), size: [1, 2, 4, 8].randomElement(using: &rng)!)
                    case 6..<8:
                        // Scribble over a ring area (rings live at 0x10000 * (q + 1)).
                        let base = 0x10000 * UInt64(Int.random(in: 1...3, using: &rng)) + UInt64.random(in: 0..<0x9000, using: &rng)
                        let bytes = (0..<Int.random(in: 1...64, using: &rng)).map { _ in UInt8.random(in: 0...255, using: &rng) }
                        try? g.memory.write(bytes, at: base)
                    case 8:
                        g.notify(Int.random(in: 0..<3, using: &rng))
                    default:
                        peerSide.send(virtioTestFrame(to: .broadcast, from: peer.mac, "noise"))
                        if let console = device as? VirtioConsole { console.receive([1, 2, 3]) }
                    }
                }
            }
            // Still a working device after all that.
            g.reset()
            g.start(queues: device.queueMaxSizes.count)
            #expect(g.status == VirtioStatus.acknowledge | VirtioStatus.driver | VirtioStatus.featuresOK | VirtioStatus.driverOK)
            switch device {
            case let blk as VirtioBlock:
                let r = g.post(0, readable: [virtioBlockHeader(BlockType.getID)], writable: [20, 1])
                g.notify(0)
                #expect(g.bytes(r.writable[1]) == [0], "\(blk.name)")
            case let net as VirtioNet:
                let buffers = VirtioNetGuest.receive(into: g, count: 4)
                peerSide.send(virtioTestFrame(to: net.mac, from: peer.mac, "hello"))
                #expect(g.takeUsed(0).contains { buffers.keys.contains(UInt16($0.id)) && $0.length == 12 + 19 })
            default:
                g.post(1, readable: [Array("ok".utf8)])
                g.notify(1)
                #expect(recorder.output.suffix(2) == Array("ok".utf8))
            }
            #expect(g.transport.diagnostics.errorCount > 0)
        }
    }
}

extension VirtioNetGuest {
    static func receive(into g: VirtioTestGuest, count: Int) -> [UInt16: GuestBuffer] {
        var buffers: [UInt16: GuestBuffer] = [:]
        for _ in 0..<count {
            let p = g.post(VirtioNet.receiveQueue, writable: [1526])
            buffers[p.head] = p.writable[0]
        }
        g.notify(VirtioNet.receiveQueue)
        return buffers
    }
}
