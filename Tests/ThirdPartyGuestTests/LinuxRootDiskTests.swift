import Foundation
import TestSupport
import Testing

/// The virtio initramfs with the ext4 root image of `Scripts/linux-rootfs-guest.sh`.
enum LinuxRootDiskGuest {
    static let prepared = LinuxGuest.prepare(script: "linux-rootfs-guest.sh", initrdKey: "virtio_initrd")

    static var available: Bool { (try? prepared.get())?.outputs["rootfs"] != nil }
    static var skipReason: Comment {
        if case let .failure(f) = prepared { return Comment(rawValue: f.reason) }
        return "Scripts/linux-rootfs-guest.sh printed no rootfs="
    }

    /// e2fsprogs' `tool` (installed by the script with mke2fs), run on the host; its output.
    static func e2fsprogs(_ tool: String, _ arguments: [String]) throws -> (status: Int32, output: String) {
        guard let path = ["/usr/sbin/\(tool)", "/sbin/\(tool)", "/usr/bin/\(tool)"].first(where: { FileManager.default.isExecutableFile(atPath: $0) }) else {
            throw LinuxGuest.PreparationFailure(reason: "no \(tool) on this host (e2fsprogs)")
        }
        return try runToCompletion(path, arguments)
    }
}

@Suite(.serialized, .enabled(if: LinuxRootDiskGuest.available, LinuxRootDiskGuest.skipReason))
struct LinuxRootDiskTests {
    /// `root=/dev/vda`: the initramfs loads virtio_blk, mounts the ext4 disk and switch_roots
    /// to it; the shell's `/` is the disk, a file written there survives `poweroff` (busybox
    /// remounts read-only, the VMM flushes the image), and the host reads it back from the
    /// image with debugfs; e2fsck finds the file system clean.
    @Test func rootFileSystemOnVirtioBlk() throws {
        let files = try LinuxRootDiskGuest.prepared.get()
        let image = FileManager.default.temporaryDirectory.appendingPathComponent("swiftvisor-rootfs-\(getpid()).ext4")
        try? FileManager.default.removeItem(at: image)
        try FileManager.default.copyItem(atPath: try #require(files.outputs["rootfs"]), toPath: image.path)
        defer { try? FileManager.default.removeItem(at: image) }

        let booted = Date()
        let run = try LinuxRun(files, cmdline: "console=ttyS0 root=/dev/vda", extraArguments: ["--disk", image.path])
        defer { run.kill() }
        let switched = run.waitFor("swiftvisor-init: switching root to /dev/vda", seconds: 400)
        try #require(switched != nil, "the initramfs did not switch to the disk:\n\(run.tail)")
        var at = run.prompt(after: switched)
        try #require(at != nil, "no shell prompt after switch_root:\n\(run.tail)")
        print("LinuxRootDiskTests: shell on the virtio-blk root after \(String(format: "%.1f", Date().timeIntervalSince(booted))) s (software engine, 1 vCPU)")

        at = run.answer("cat /proc/mounts", expecting: "/dev/vda / ext4 rw", after: at)
        try #require(at != nil, "/ is not the virtio disk:\n\(run.tail)")
        at = run.answer("echo written-on-vda-$((6*7)) > /root/marker && sync && cat /root/marker", expecting: "written-on-vda-42", after: at)
        try #require(at != nil, "writing /root/marker failed:\n\(run.tail)")
        at = run.prompt(after: at)
        try #require(at != nil, "no prompt after the write:\n\(run.tail)")

        try run.powersOffCleanly(after: at)
        #expect(!run.text.contains("EXT4-fs error"), "\(run.tail)")

        let marker = try LinuxRootDiskGuest.e2fsprogs("debugfs", ["-R", "cat /root/marker", image.path])
        #expect(marker.output.contains("written-on-vda-42\n"), "the file is not in the image: \(marker.output)")
        let check = try LinuxRootDiskGuest.e2fsprogs("e2fsck", ["-f", "-n", image.path])
        #expect(check.status == 0, "e2fsck: \(check.output)")
    }
}
