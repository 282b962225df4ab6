import Foundation
import TestSupport
import Testing
import VMM
import VirtCore

/// The microVM use case: Debian's kernel booted to its busybox shell is snapshotted at the
/// prompt, and each restore — eager and lazy — answers a command typed on its console. The
/// PC platform's state (local APIC and its timer, I/O APIC, COM1 and its interrupt line)
/// must come back with RAM and the vCPU for the restored shell to hear its input.
@Suite(.serialized, .enabled(if: LinuxGuest.available, LinuxGuest.skipReason))
struct LinuxSnapshotTests {
    @Test func restoredShellAnswers() throws {
        let files = try LinuxGuest.prepared.get()
        let kernel = try [UInt8](Data(contentsOf: URL(fileURLWithPath: files.kernel)))
        let initrd = try [UInt8](Data(contentsOf: URL(fileURLWithPath: files.initrd)))
        let console = SerialCapture()
        let configuration = MachineConfiguration(memorySize: 256 << 20, commandLine: "console=ttyS0",
                                                 timeoutSeconds: 900)
        let machine = try PCPlatform.machine(kernel: kernel, modules: [(initrd, "")], configuration: configuration,
                                             engine: try TestEngines.make(.software), serialOutput: console.append)
        let runner = HostThread(name: "linux") { _ = try? machine.run() }
        defer { machine.stop(); runner.join() }
        try #require(waitUntil(seconds: 600) { console.text.contains("/ # ") }, "no shell prompt:\n\(console.text.suffix(2000))")

        let path = FileManager.default.temporaryDirectory.appendingPathComponent("swiftvisor-linux-\(getpid()).snap").path
        defer { unlink(path) }
        _ = try machine.snapshot(to: path)
        machine.stop()
        runner.join()

        for lazy in [false, true] {
            let out = SerialCapture()
            let clone = try Machine(restoring: try SnapshotFile(path: path), engine: try TestEngines.make(.software), lazy: lazy,
                                    timeoutSeconds: 600, serialOutput: out.append)
            let cloneRunner = HostThread(name: "linux-clone") { _ = try? clone.run() }
            clone.uart.enqueueInput(Array("echo restored-$((6*7))\n".utf8))
            #expect(waitUntil(seconds: 300) { out.text.contains("restored-42") },
                    "restore (lazy: \(lazy)) did not answer:\n\(out.text.suffix(2000))")
            clone.stop()
            cloneRunner.join()
        }
    }
}
