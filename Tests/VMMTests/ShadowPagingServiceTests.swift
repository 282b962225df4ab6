import Foundation
import GuestImages
import Testing
import TestSupport
import VirtCore
@testable import VMM
import X86Emulator

/// VMM services that work through the second level keep working with shadow paging: the
/// pager composes the guest's tables with the second level, so a copy-on-write snapshot's
/// write protection reaches the guest through the shadow tables.
@Suite struct ShadowPagingServiceTests {
    @Test func copyOnWriteSnapshotOfAShadowPagedGuest() throws {
        let path = temporaryPath("shadow-snap")
        defer { unlink(path) }
        let out = SerialCapture()
        let guest = try #require(BundledGuests.named("counter"))
        var config = MachineConfiguration(memorySize: 32 << 20, commandLine: "limit=60 work=20000 touch=64", timeoutSeconds: 120)
        config.paging = .shadow
        config.guestName = "counter"
        let m = try Machine(image: try ELFImage(bytes: guest.elf), configuration: config, engine: try TestEngines.make(.software), serialOutput: out.append)
        let runner = HostThread(name: "counter") { _ = try? m.run() }
        defer { m.stop(); runner.join() }
        #expect(waitUntil { out.text.contains("count 10\n") })
        var atSnapshot = ""
        var ram: [UInt8] = []
        let report = try m.snapshot(to: path, note: "shadow", whilePaused: {
            atSnapshot = out.text
            ram = try! m.memory.read(at: 0, count: Int(m.memory.size))
        })
        #expect(waitUntil { out.text.contains("count 60\n") })
        #expect(report.copyOnWriteFaults > 0, "the guest wrote while the snapshot was written")
        let file = try SnapshotFile(path: path)
        var restored = [UInt8](repeating: 0, count: ram.count)
        try restored.withUnsafeMutableBytes { try file.restoreMemory(into: $0.baseAddress!, size: UInt64($0.count)) }
        #expect(restored == ram)
        let stats = try #require(m.shadowPager?.statistics)
        #expect(stats.secondLevelViolations > 0 && stats.fullResets > 0)
        // The clone, nested-paged, prints what the original printed after the snapshot point.
        let cloneOut = SerialCapture()
        let clone = try Machine(restoring: file, engine: try TestEngines.make(.software), lazy: false, timeoutSeconds: 120, serialOutput: cloneOut.append)
        #expect(try clone.run().stopReason == .exitPort(status: 0))
        #expect(atSnapshot + cloneOut.text == out.text)
    }

    /// Nested mode has no pager; the software engine offers shadow paging and MBEC.
    @Test func pagerOnlyInShadowMode() throws {
        let guest = try #require(BundledGuests.named("hello"))
        let m = try Machine(image: try ELFImage(bytes: guest.elf), configuration: MachineConfiguration(memorySize: 16 << 20),
                            engine: try TestEngines.make(.software), serialOutput: { _ in })
        #expect(m.shadowPager == nil)
        #expect(m.vm.capabilities.contains(.shadowPaging) && m.vm.capabilities.contains(.modeBasedExecute))
    }
}
