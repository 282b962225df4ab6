import Synchronization
import Testing
import VirtCore
@testable import Devices
#if canImport(Glibc)
import Glibc
#endif

@Suite struct VirtioConsoleTests {
    func makeConsole(maxBufferedInput: Int = 1 << 20) throws -> (VirtioConsole, VirtioTestGuest) {
        let recorder = VirtioRecorder()
        let console = VirtioConsole(maxBufferedInput: maxBufferedInput, output: recorder.sink)
        return (console, try VirtioTestGuest(console, recorder: recorder))
    }

    @Test func transmittedBytesReachTheSink() throws {
        let (console, g) = try makeConsole()
        g.start(queues: 2)
        #expect(g.reg(Reg.deviceID) == 3)
        #expect(g.transport.offeredFeatures == VirtioFeature.version1 | VirtioConsole.featureEmergencyWrite)
        g.post(1, readable: [Array("hello, ".utf8)])
        g.post(1, readable: [Array("wor".utf8), Array("ld\n".utf8)])
        g.notify(1)
        #expect(g.recorder.text == "hello, world\n")
        #expect(g.takeUsed(1).map(\.length) == [0, 0])
        #expect(g.recorder.lineAsserted)
        #expect(console.transmittedBytes == 13)
    }

    @Test func inputWaitsForReceiveBuffers() throws {
        let (console, g) = try makeConsole()
        console.receive(Array("early".utf8))  // before the driver exists
        g.start(queues: 2)
        #expect(console.pendingInputCount == 5)
        let b = g.post(0, writable: [3])
        let c = g.post(0, writable: [16])
        g.notify(0)
        #expect(g.takeUsed(0).map(\.length) == [3, 2])
        #expect(g.bytes(b.writable[0]) == Array("ear".utf8))
        #expect(Array(g.bytes(c.writable[0]).prefix(2)) == Array("ly".utf8))
        #expect(console.pendingInputCount == 0)

        // Buffers already posted: input goes straight in, with an interrupt.
        let d = g.post(0, writable: [8])
        g.notify(0)
        #expect(g.takeUsed(0).isEmpty)
        g.ackInterrupts()
        console.receive(Array("now".utf8))
        #expect(g.takeUsed(0).map(\.length) == [3])
        #expect(Array(g.bytes(d.writable[0]).prefix(3)) == Array("now".utf8))
        #expect(g.reg(Reg.interruptStatus) == VirtioInterrupt.usedBuffer)
        #expect(console.deliveredBytes == 8)
    }

    @Test func bufferedInputIsBounded() throws {
        let (console, g) = try makeConsole(maxBufferedInput: 4)
        g.start(queues: 2)
        console.receive(Array("abcdef".utf8))
        #expect(console.pendingInputCount == 4)
        #expect(console.droppedInputBytes == 2)
        let b = g.post(0, writable: [8])
        g.notify(0)
        #expect(Array(g.bytes(b.writable[0]).prefix(4)) == Array("abcd".utf8))
    }

    @Test func emergencyWriteGoesStraightToTheSink() throws {
        let (_, g) = try makeConsole()
        g.transport.mmioWrite(offset: 0x108, size: 4, value: UInt64(UInt8(ascii: "!")))
        #expect(g.recorder.text == "!")
        #expect(g.transport.mmioRead(offset: 0x104, size: 4) == 1)  // max_nr_ports
    }

    @Test func anEchoingSinkDoesNotDeadlock() throws {
        let box = Mutex<VirtioConsole?>(nil)
        let recorder = VirtioRecorder()
        let console = VirtioConsole(output: { bytes in
            recorder.sink(bytes)
            box.withLock { $0 }?.receive(bytes.map { $0 ^ 0x20 })  // echo, upper-cased
        })
        box.withLock { $0 = console }
        let g = try VirtioTestGuest(console, recorder: recorder)
        g.start(queues: 2)
        let rx = g.post(0, writable: [16])
        g.notify(0)
        g.post(1, readable: [Array("echo".utf8)])
        g.notify(1)
        #expect(recorder.text == "echo")
        #expect(g.takeUsed(0).map(\.length) == [4])
        #expect(Array(g.bytes(rx.writable[0]).prefix(4)) == Array("ECHO".utf8))
        box.withLock { $0 = nil }
    }

    @Test func inputFromAnotherThreadArrivesInOrder() throws {
        let (console, g) = try makeConsole()
        g.start(queues: 2, size: 64)
        let expected = (0..<20_000).map { UInt8(truncatingIfNeeded: $0 % 251) }
        // A real thread, as a host terminal reader would be, racing the "vCPU" below.
        let sender = startVirtioThread {
            for chunk in stride(from: 0, to: expected.count, by: 137) {
                console.receive(expected[chunk..<min(chunk + 137, expected.count)])
            }
        }
        var received: [UInt8] = []
        var outstanding: [UInt16: GuestBuffer] = [:]
        var idleRounds = 0
        while received.count < expected.count && idleRounds < 20_000 {
            while outstanding.count < 32 {
                let p = g.post(0, writable: [97])
                outstanding[p.head] = p.writable[0]
            }
            g.notify(0)
            let used = g.takeUsed(0)
            for (id, length) in used {
                let removed = outstanding.removeValue(forKey: UInt16(id))
                let buffer = try #require(removed)
                received += g.bytes(buffer).prefix(Int(length))
            }
            if used.isEmpty {
                idleRounds += 1
                usleep(500)
            }
        }
        pthread_join(sender, nil)
        #expect(received == expected)
        #expect(g.transport.diagnostics.errorCount == 0)
    }
}

/// Starts `body` on a new pthread; join it with pthread_join.
func startVirtioThread(_ body: @escaping @Sendable () -> Void) -> pthread_t {
    let task = VirtioThreadTask(body)
    var thread = pthread_t()
    let created = pthread_create(&thread, nil, { context in
        guard let context else { return nil }
        Unmanaged<VirtioThreadTask>.fromOpaque(context).takeRetainedValue().body()
        return nil
    }, Unmanaged.passRetained(task).toOpaque())
    precondition(created == 0, "pthread_create failed")
    return thread
}
