import Foundation
import Devices
import GuestImages
import TestSupport
import Testing
import VirtCore
@testable import VMM
#if canImport(Glibc)
import Glibc
#endif

func temporaryPath(_ name: String) -> String {
    NSTemporaryDirectory() + "swiftvisor-\(name)-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
}

@Suite struct SnapshotTests {
    /// Runs `counter` until it printed `after` lines, snapshots it, lets it finish; returns
    /// the machine's whole output, the output at the snapshot point, the report, and the RAM
    /// as it was at the snapshot point.
    func snapshotCounter(engine: EngineChoice, path: String, touch: Int) throws -> (full: String, atSnapshot: String, report: SnapshotReport, ram: [UInt8]) {
        let out = SerialCapture()
        let guest = try #require(BundledGuests.named("counter"))
        let m = try Machine(image: try ELFImage(bytes: guest.elf),
                            configuration: MachineConfiguration(memorySize: 32 << 20, commandLine: "limit=60 work=20000 touch=\(touch)", timeoutSeconds: 120,
                                                                guestName: "counter"),
                            engine: try TestEngines.make(engine), serialOutput: out.append)
        let runner = HostThread(name: "counter") { _ = try? m.run() }
        defer { m.stop(); runner.join() }
        #expect(waitUntil { out.text.contains("count 10\n") })
        var atSnapshot = ""
        var ram: [UInt8] = []
        let report = try m.snapshot(to: path, note: "test", whilePaused: {
            atSnapshot = out.text
            ram = try! m.memory.read(at: 0, count: Int(m.memory.size))
        })
        #expect(waitUntil { out.text.contains("count 60\n") })
        return (out.text, atSnapshot, report, ram)
    }

    @Test(arguments: TestEngines.available)
    func snapshotHoldsTheRAMOfTheSnapshotPointWhileTheGuestKeepsWriting(engine: EngineChoice) throws {
        let path = temporaryPath("snap")
        defer { unlink(path) }
        let (full, atSnapshot, report, ram) = try snapshotCounter(engine: engine, path: path, touch: 64)
        #expect(full.hasPrefix(atSnapshot))
        #expect(report.copyOnWriteFaults > 0, "the guest wrote while the snapshot was written")
        #expect(report.pauseSeconds < report.totalSeconds)
        let file = try SnapshotFile(path: path)
        #expect(file.metadata.engine == engine.rawValue)
        #expect(file.metadata.note == "test")
        var restored = [UInt8](repeating: 0, count: ram.count)
        try restored.withUnsafeMutableBytes { try file.restoreMemory(into: $0.baseAddress!, size: UInt64($0.count)) }
        #expect(restored == ram)  // pre-write contents, not what the guest wrote afterwards
    }

    /// RAM the guest never wrote is neither read (which would allocate it on the host) nor
    /// written: it stays a hole of the snapshot file, and the file still verifies.
    @Test(arguments: TestEngines.available)
    func neverWrittenRAMStaysAHoleOfTheHostAndOfTheFile(engine: EngineChoice) throws {
        let path = temporaryPath("sparse")
        defer { unlink(path) }
        let out = SerialCapture()
        let guest = try #require(BundledGuests.named("counter"))
        let m = try Machine(image: try ELFImage(bytes: guest.elf),
                            configuration: MachineConfiguration(memorySize: 256 << 20, commandLine: "work=20000 touch=1", timeoutSeconds: 120,
                                                                guestName: "counter"),
                            engine: try TestEngines.make(engine), serialOutput: out.append)
        let runner = HostThread(name: "counter") { _ = try? m.run() }
        defer { m.stop(); runner.join() }
        #expect(waitUntil { out.text.contains("count 5\n") })
        let allocatedBefore = m.memory.allocatedBytes
        let report = try m.snapshot(to: path, note: "sparse")
        #expect(m.memory.allocatedBytes < allocatedBefore + (8 << 20), "the snapshot read never-written RAM")
        var st = stat()
        #expect(stat(path, &st) == 0)
        #expect(UInt64(st.st_size) == report.fileBytes && st.st_size > 256 << 20)
        #expect(Int(st.st_blocks) * 512 < 64 << 20, "never-written RAM was written to the file")
        let file = try SnapshotFile(path: path)
        try file.verifyMemory()
        // An eager restore leaves the holes unallocated too, and the clone runs on.
        let cloneOutput = SerialCapture()
        let clone = try Machine(restoring: try SnapshotFile(path: path), engine: try TestEngines.make(engine),
                                timeoutSeconds: 120, serialOutput: cloneOutput.append)
        #expect(clone.memory.allocatedBytes < 64 << 20)
        let cloneRunner = HostThread(name: "clone") { _ = try? clone.run() }
        defer { clone.stop(); cloneRunner.join() }
        #expect(waitUntil { cloneOutput.text.contains("count") })
    }

    @Test(arguments: TestEngines.available, [false, true])
    func twoClonesContinueFromTheSnapshotCount(engine: EngineChoice, lazy: Bool) throws {
        let path = temporaryPath("snap")
        defer { unlink(path) }
        let (full, atSnapshot, _, _) = try snapshotCounter(engine: engine, path: path, touch: 1)
        for _ in 0..<2 {
            let out = SerialCapture()
            let clone = try Machine(restoring: try SnapshotFile(path: path), engine: try TestEngines.make(engine), lazy: lazy,
                                    timeoutSeconds: 120, serialOutput: out.append)
            let r = try clone.run()
            #expect(r.stopReason == .exitPort(status: 0))
            // The clone prints exactly what the original printed after the snapshot point.
            #expect(atSnapshot + out.text == full)
            if lazy { #expect(clone.lazyRestoreFaults > 0 && clone.lazyRestorePagesLoaded >= clone.lazyRestoreFaults) }
        }
    }

    @Test(.requiresKVM("restores a software-engine snapshot on the kvm engine: \(noKVM)"))
    func restoreOnAnotherEngineIsAClearError() throws {
        let path = temporaryPath("snap")
        defer { unlink(path) }
        _ = try snapshotCounter(engine: .software, path: path, touch: 1)
        #expect(throws: MachineSnapshotError.self) {
            _ = try Machine(restoring: try SnapshotFile(path: path), engine: try TestEngines.make(.kvm), serialOutput: { _ in })
        }
    }
}

@Suite struct SnapshotWithDevicesTests {
    /// vconsole waits for a line on its virtio console; the snapshot taken while it waits
    /// restores into a clone whose console (queues, posted buffers, interrupt) still works.
    @Test(arguments: TestEngines.available)
    func cloneOfAVMWaitingOnVirtioConsoleStillTakesInput(engine: EngineChoice) throws {
        let path = temporaryPath("snap-dev")
        defer { unlink(path) }
        let out = SerialCapture()
        let guest = try #require(BundledGuests.named("vconsole"))
        let m = try Machine(image: try ELFImage(bytes: guest.elf), configuration: MachineConfiguration(memorySize: 32 << 20, timeoutSeconds: 60),
                            engine: try TestEngines.make(engine), serialOutput: { _ in })
        let console = try m.addVirtioConsole { bytes in bytes.forEach(out.append) }.device as! VirtioConsole
        let runner = HostThread(name: "vconsole") { _ = try? m.run() }
        #expect(waitUntil { out.text == "Hello through virtio-console!\n" })
        _ = try m.snapshot(to: path)
        console.receive(Array("to the original\n".utf8))
        runner.join()
        #expect(out.text.hasSuffix("vconsole echo: to the original\n"))

        let file = try SnapshotFile(path: path)
        #expect(file.devices.contains { $0.name == "virtio0" })
        let cloneOut = SerialCapture()
        let clone = try Machine(restoring: file, engine: try TestEngines.make(engine), timeoutSeconds: 60, serialOutput: cloneOut.append)
        let cloneConsole = try #require(clone.virtioTransports.first?.device as? VirtioConsole)
        cloneConsole.receive(Array("to the clone\n".utf8))
        let r = try clone.run()
        #expect(r.stopReason == .exitPort(status: 0))
        #expect(cloneOut.text == "vconsole echo: to the clone\n")
    }

    @Test func machinesWithUnsupportedDevicesAreRefusedClearly() throws {
        let guest = try #require(BundledGuests.named("hello"))
        let m = try Machine(image: try ELFImage(bytes: guest.elf), configuration: MachineConfiguration(memorySize: 16 << 20),
                            engine: try TestEngines.make(.software), serialOutput: { _ in })
        try m.addEmulatedNIC(backend: NetworkSwitch(name: "x").makePort())
        #expect {
            _ = try m.snapshot(to: temporaryPath("never"))
        } throws: { "\($0)".contains("emulated-nic") }
    }
}

@Suite struct LazyRestoreFailureTests {
    /// A memory chunk corrupted after the snapshot was written: the lazy restore stops the
    /// VM with the reason when the guest first touches it, rather than running on zeros.
    @Test(arguments: TestEngines.available)
    func corruptChunkStopsTheVMWithTheReason(engine: EngineChoice) throws {
        let path = temporaryPath("snap-corrupt")
        defer { unlink(path) }
        _ = try SnapshotTests().snapshotCounter(engine: engine, path: path, touch: 1)
        let offset = try SnapshotFile(path: path).memoryOffset
        let fd = open(path, O_RDWR)
        defer { close(fd) }
        var byte: UInt8 = 0
        let at = off_t(offset) + 0x10_0000 + 64  // the guest image's first page
        #expect(pread(fd, &byte, 1, at) == 1)
        byte ^= 0xFF
        #expect(pwrite(fd, &byte, 1, at) == 1)
        let clone = try Machine(restoring: try SnapshotFile(path: path), engine: try TestEngines.make(engine), lazy: true,
                                timeoutSeconds: 60, serialOutput: { _ in })
        let r = try clone.run()
        guard case let .engineFailure(_, .lazyRestore(page, reason)) = r.stopReason else {
            Issue.record("expected a lazy-restore failure, got \(r.stopReason)")
            return
        }
        #expect(page / 16 == 16)  // a page of the corrupted 64 KiB chunk
        #expect(reason.contains("chunk 16"))
    }
}
