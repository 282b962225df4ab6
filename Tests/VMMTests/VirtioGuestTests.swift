import Devices
import Foundation
import GuestImages
import TestSupport
import Testing
import VirtCore
@testable import VMM
#if canImport(Glibc)
import Glibc
#endif

/// A temporary raw disk image; removed on deinit.
final class TemporaryDisk {
    let path: String
    init(sectors: Int, sector0: String) throws {
        path = FileManager.default.temporaryDirectory.appendingPathComponent("swiftvisor-disk-\(getpid())-\(UInt64.random(in: 0...UInt64.max)).img").path
        var bytes = [UInt8](repeating: 0, count: sectors * 512)
        bytes.replaceSubrange(0..<sector0.utf8.count, with: Array(sector0.utf8))
        try Data(bytes).write(to: URL(fileURLWithPath: path))
    }
    deinit { unlink(path) }
    func sector(_ n: Int) throws -> [UInt8] {
        let data = try Data(contentsOf: URL(fileURLWithPath: path))
        return Array(data[(n * 512)..<((n + 1) * 512)])
    }
}

@Suite struct VirtioBlockGuestTests {
    @Test(arguments: TestEngines.available, [true, false])
    func guestReadsAndWritesTheImageFile(engine: EngineChoice, interrupts: Bool) throws {
        let disk = try TemporaryDisk(sectors: 64, sector0: "boot sector of a test image\n")
        let capture = SerialCapture()
        let m = try bundledMachine("disk", engine: engine, commandLine: "irq=\(interrupts ? 1 : 0)", capture: capture)
        let transport = try m.addVirtioBlock(path: disk.path)
        let r = try m.run()
        #expect(r.stopReason == .exitPort(status: 0), "\(capture.text)")
        let lines = capture.text.split(separator: "\n").map(String.init)
        #expect(lines.first == "disk: 64 sectors, \(interrupts ? "interrupts" : "polling")")
        #expect(lines.dropFirst().first == "disk: sector 0: boot sector of a test image")
        #expect(lines.contains("disk: reading past the end is refused, as it should be (status 1)"))
        let expected = Array("written by the disk guest through virtio-blk\n".utf8)
        #expect(try Array(disk.sector(1).prefix(expected.count)) == expected)  // the host sees the write
        #expect(!transport.needsReset)
    }

    @Test(arguments: TestEngines.available)
    func readOnlyImageRefusesWritesAndStaysUnchanged(engine: EngineChoice) throws {
        let disk = try TemporaryDisk(sectors: 8, sector0: "read-only\n")
        let before = try disk.sector(1)
        let capture = SerialCapture()
        let m = try bundledMachine("disk", engine: engine, capture: capture)
        try m.addVirtioBlock(path: disk.path, readOnly: true)
        let r = try m.run()
        #expect(r.stopReason == .exitPort(status: 0), "\(capture.text)")
        #expect(capture.text.contains("disk: 8 sectors, read-only"))
        #expect(capture.text.contains("write to a read-only disk refused (IOERR)"))
        #expect(try disk.sector(1) == before)
    }

    @Test func missingImageIsAClearError() throws {
        let capture = SerialCapture()
        let m = try bundledMachine("disk", engine: .software, capture: capture)
        #expect {
            try m.addVirtioBlock(path: "/nonexistent/disk.img")
        } throws: { "\($0)".contains("does not exist") }
    }
}

/// Counts what a guest sends; answers nothing.
final class FrameCounter: NetworkBackend, @unchecked Sendable {
    private let lock = NSLock()
    private var frames: [[UInt8]] = []
    func send(_ frame: [UInt8]) { lock.withLock { frames.append(frame) } }
    func setReceiver(_ receiver: (any NetworkFrameReceiver)?) {}
    var sent: [[UInt8]] { lock.withLock { frames } }
}

@Suite struct VirtioNetGuestTests {
    @Test(arguments: TestEngines.available, [true, false])
    func twoVMsExchangeFramesOverASwitch(engine: EngineChoice, interrupts: Bool) throws {
        let lan = "test-lan-\(engine)-\(interrupts)-\(UInt32.random(in: 0...UInt32.max))"
        let pingOut = SerialCapture(), pongOut = SerialCapture()
        let ping = try bundledMachine("net-ping", engine: engine, commandLine: "count=5 irq=\(interrupts ? 1 : 0)", capture: pingOut)
        let pong = try bundledMachine("net-ping", engine: engine, commandLine: "pong=1 count=5 irq=\(interrupts ? 1 : 0)", capture: pongOut)
        try pong.addVirtioNet(backend: NetworkAttachment.networkSwitch(lan).makeBackend())
        try ping.addVirtioNet(backend: NetworkAttachment.networkSwitch(lan).makeBackend())
        // The pong VM must be listening before pings arrive; frames for a guest whose
        // driver is not ready are dropped, so ping starts once pong printed its banner.
        let pongThread = HostThread(name: "pong") { _ = try? pong.run() }
        try #require(waitUntil { pongOut.text.contains("net: pong") }, "pong VM never became ready: \(pongOut.text)")
        let r = try ping.run()
        pongThread.join()
        #expect(r.stopReason == .exitPort(status: 0), "\(pingOut.text)")
        #expect(pingOut.text.hasSuffix("net: echoed 5 of 5 frames\n"))
        #expect(pongOut.text.hasSuffix("net: answered 5 of 5 frames\n"))
    }

    @Test(arguments: TestEngines.available)
    func emulatedNICTransmitsEveryFrame(engine: EngineChoice) throws {
        let out = SerialCapture()
        let m = try bundledMachine("net-bench", engine: engine, commandLine: "nic=1 count=20 size=100", capture: out)
        let sink = FrameCounter()
        let nic = try m.addEmulatedNIC(backend: sink)
        let r = try m.run()
        #expect(r.stopReason == .exitPort(status: 0), "\(out.text)")
        #expect(sink.sent.count == 20)
        #expect(sink.sent.allSatisfy { $0.count == 100 && Array($0[6..<12]) == nic.mac.bytes })
        #expect(r.statistics[.mmio].count >= 20 * 5)  // 4 register writes + a status read per frame
    }

    @Test(arguments: TestEngines.available)
    func virtioNetBatchesFramesPerNotify(engine: EngineChoice) throws {
        let out = SerialCapture()
        let m = try bundledMachine("net-bench", engine: engine, commandLine: "count=64 size=100 batch=32", capture: out)
        let sink = FrameCounter()
        try m.addVirtioNet(backend: sink)
        let r = try m.run()
        #expect(r.stopReason == .exitPort(status: 0), "\(out.text)")
        #expect(sink.sent.count == 64)
        #expect(sink.sent.allSatisfy { $0.count == 100 })
        #expect(r.statistics[.mmio].count < 64 * 5 / 4)
    }
}

@Suite(.requiresKVM("ioeventfd is the kvm engine's notification offload: \(noKVM)"))
struct IOEventFDTests {
    /// Runs the disk guest; returns its QueueNotify exits to userspace and the doorbell count.
    func run(ioeventfd: Bool) throws -> (notifyExits: Int, doorbells: UInt64) {
        let disk = try TemporaryDisk(sectors: 16, sector0: "ioeventfd\n")
        let capture = SerialCapture()
        let guest = try #require(BundledGuests.named("disk"))
        var config = MachineConfiguration(memorySize: 32 << 20, timeoutSeconds: 60, recordExits: true)
        config.ioeventfd = ioeventfd
        let m = try Machine(image: try ELFImage(bytes: guest.elf), configuration: config, engine: try TestEngines.make(.kvm),
                            serialOutput: capture.append)
        try m.addVirtioBlock(path: disk.path)
        let r = try m.run()
        #expect(r.stopReason == .exitPort(status: 0), "\(capture.text)")
        #expect(capture.text.contains("disk: wrote, flushed and read back sector 1 (5 notifies"))
        let notify = BootLayout.mmioWindowBase + VirtioMMIOTransport.queueNotifyOffset
        let notifyExits = r.exitTrace[0].filter { if case let .mmio(a) = $0 { return a.address == notify } else { return false } }.count
        return (notifyExits, m.doorbellNotifications)
    }

    @Test func queueNotifiesGoThroughTheKernelInsteadOfExiting() throws {
        let with = try run(ioeventfd: true), without = try run(ioeventfd: false)
        #expect(with.doorbells == 5)
        #expect(without.doorbells == 0)
        #expect(with.notifyExits == 0)
        #expect(without.notifyExits == 5)
    }
}
