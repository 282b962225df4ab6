import Foundation
import TestSupport
import Testing
import VMM
import VirtCore

/// The microVM use case with its root on a virtio-pci disk: Debian's kernel switched to an
/// ext4 root on virtio-blk over virtio-pci (MSI-X) is snapshotted at the shell prompt, and
/// each restore — eager and lazy — writes a file to that root, syncs, and powers off
/// cleanly; the host then finds the file in the image (debugfs) and e2fsck finds the file
/// system clean. The PCI function (BARs, MSI-X table, queue state) must come back with RAM
/// for the restored kernel's next disk request to reach the device and its completion
/// interrupt to reach the vCPU.
@Suite(.serialized, .enabled(if: LinuxRootDiskGuest.available, LinuxRootDiskGuest.skipReason))
struct LinuxPCISnapshotTests {
    @Test func restoredVMsWriteToTheirVirtioPCIRootAndPowerOff() throws {
        let files = try LinuxRootDiskGuest.prepared.get()
        let scratch = FileManager.default.temporaryDirectory.appendingPathComponent("swiftvisor-pcisnap-\(getpid())")
        try FileManager.default.createDirectory(at: scratch, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: scratch) }
        let image = scratch.appendingPathComponent("root.ext4").path
        let atSnapshot = scratch.appendingPathComponent("root-at-snapshot.ext4").path
        let snapshotPath = scratch.appendingPathComponent("vm.snap").path
        try FileManager.default.copyItem(atPath: try #require(files.outputs["rootfs"]), toPath: image)

        let booted = Date()
        do {
            let vm = try LinuxMachine(files, name: "pci-root", commandLine: "console=ttyS0 root=/dev/vda") {
                try $0.addVirtioPCIBlock(path: image)
            }
            defer { vm.stop() }
            let switched = vm.waitFor("swiftvisor-init: switching root to /dev/vda", seconds: 400)
            try #require(switched != nil, "the initramfs did not switch to the disk:\n\(vm.tail)")
            var at = vm.prompt(after: switched)
            try #require(at != nil, "no shell prompt after switch_root:\n\(vm.tail)")
            at = vm.answer("sync && echo synced-$((6*7))", expecting: "synced-42", after: at)
            try #require(at != nil, "sync failed:\n\(vm.tail)")
            try #require(vm.prompt(after: at) != nil, "no prompt after sync:\n\(vm.tail)")
            print("LinuxPCISnapshotTests: shell on the virtio-pci root after \(String(format: "%.1f", Date().timeIntervalSince(booted))) s (software engine)")
            // Stopped at the snapshot point, so the image matches the saved RAM's view of it.
            let report = try vm.machine.snapshot(to: snapshotPath, whilePaused: { vm.machine.stop() })
            print("LinuxPCISnapshotTests: snapshot paused the VM \(String(format: "%.1f", report.pauseSeconds * 1000)) ms (\(report.mechanism))")
        }
        // The first VM is gone (its disk unlocked); each restore starts from the image as it was then.
        try FileManager.default.copyItem(atPath: image, toPath: atSnapshot)
        let snapshot = try SnapshotFile(path: snapshotPath)
        for lazy in [false, true] {
            let token = lazy ? "lazy" : "eager"
            try? FileManager.default.removeItem(atPath: image)
            try FileManager.default.copyItem(atPath: atSnapshot, toPath: image)
            do {
                let vm = try LinuxMachine(name: "pci-root-\(token)") { output in
                    try Machine(restoring: snapshot, engine: try TestEngines.make(.software), lazy: lazy, timeoutSeconds: 600, serialOutput: output)
                }
                defer { vm.stop() }
                #expect(vm.machine.pcPCI?.virtioTransports.count == 1)
                let echoed = vm.answer("echo \(token)-$((6*7)) > /root/restored && sync && cat /root/restored",
                                       expecting: "\(token)-42", after: nil)
                try #require(echoed != nil, "the \(token) restore did not write its root:\n\(vm.tail)")
                let at = vm.prompt(after: echoed)
                try #require(at != nil, "no prompt after the write:\n\(vm.tail)")
                vm.type("poweroff")
                #expect(vm.waitFor("reboot: Power down", after: at, seconds: 120) != nil, "\(vm.tail)")
                _ = waitUntil(seconds: 120) { !vm.isRunning }
                let ended = try? vm.ended?.get()
                #expect(ended == .exitPort(status: 0), "the \(token) restore ended with \(vm.ended.map { "\($0)" } ?? "nothing (still running)"):\n\(vm.tail)")
                #expect(!vm.text.contains("EXT4-fs error") && !vm.text.contains("Kernel panic"), "\(vm.tail)")
            }
            let marker = try LinuxRootDiskGuest.e2fsprogs("debugfs", ["-R", "cat /root/restored", image])
            #expect(marker.output.contains("\(token)-42\n"), "the \(token) restore's file is not in the image: \(marker.output)")
            let check = try LinuxRootDiskGuest.e2fsprogs("e2fsck", ["-f", "-n", image])
            #expect(check.status == 0, "e2fsck after the \(token) restore: \(check.output)")
        }
    }
}
