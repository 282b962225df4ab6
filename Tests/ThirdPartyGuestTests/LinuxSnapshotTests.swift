import Foundation
import Lab
import Testing
import VMM

/// The microVM use case: Debian's kernel booted to its busybox shell is snapshotted at the
/// prompt, and each restore — eager and lazy — answers a command typed on its console. The
/// PC platform's state (local APIC and its timer, I/O APIC, COM1 and its interrupt line)
/// must come back with RAM and the vCPU for the restored shell to hear its input. The same
/// code measures the restores in `swiftvisor bench linux-restore`.
@Suite(.serialized, .enabled(if: LinuxGuest.available, LinuxGuest.skipReason))
struct LinuxSnapshotTests {
    @Test func restoredShellAnswers() throws {
        let files = try LinuxGuest.prepared.get()
        var benchmark = LinuxRestoreBenchmark(kernel: files.kernel, initrd: files.initrd)
        benchmark.runs = 1
        benchmark.directory = FileManager.default.temporaryDirectory.path
        // Each restore throws unless its shell printed the answer of `echo TOKEN-$((6*7))`.
        let result = try benchmark.run(engine: .software)
        #expect(result.restores.map(\.lazy).sorted { !$0 && $1 } == [false, true])
        let lazy = try #require(result.restores.first { $0.lazy })
        // The lazy restore's RAM came through userfaultfd, not a read of the file.
        #expect(lazy.pagesFaultedIn > 0)
        // The first fault in a chunk places the chunk's other non-zero pages too.
        #expect(lazy.pagesLoaded > lazy.pagesFaultedIn)
        #expect(result.restores.first { !$0.lazy }?.pagesFaultedIn == 0)
    }
}
