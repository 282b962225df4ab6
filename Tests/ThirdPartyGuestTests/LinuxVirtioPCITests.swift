import Foundation
import TestSupport
import Testing

/// The kernel of `LinuxGuest` with the initramfs of `Scripts/linux-virtio-guest.sh`: the
/// same busybox, plus Debian's virtio modules, loaded by /init before the plain /init runs.
enum LinuxVirtioGuest {
    static let prepared = LinuxGuest.prepare(script: "linux-virtio-guest.sh", initrdKey: "virtio_initrd")

    static var available: Bool { (try? prepared.get()) != nil }
    static var skipReason: Comment {
        if case let .failure(f) = prepared { return Comment(rawValue: f.reason) }
        return ""
    }
}

@Suite(.serialized, .enabled(if: LinuxVirtioGuest.available, LinuxVirtioGuest.skipReason))
struct LinuxVirtioPCITests {
    /// Linux enumerates bus 0 (configuration mechanism #1 or ECAM from the MCFG table),
    /// keeps the BARs placed for it, and its own virtio_pci, virtio_blk and virtio_net
    /// drivers bind: MSI-X vectors per queue, the disk's size read from its configuration
    /// (2048 sectors: a 1 MiB image), the NIC registered as eth0.
    @Test func linuxDriversFindADiskAndANICOnVirtioPCI() throws {
        let files = try LinuxVirtioGuest.prepared.get()
        let disk = FileManager.default.temporaryDirectory.appendingPathComponent("swiftvisor-vpci-\(getpid()).img")
        try Data(count: 1 << 20).write(to: disk)
        defer { try? FileManager.default.removeItem(at: disk) }
        let run = try LinuxRun(files, extraArguments: ["--disk", disk.path, "--net", "switch:vpci-\(getpid())"])
        defer { run.kill() }
        let banner = run.waitFor("Linux version 6.", seconds: 180)
        try #require(banner != nil, "no kernel banner on the serial console:\n\(run.tail)")
        // Enumeration: the host bridge and both devices, their BARs kept where they were placed.
        for milestone in ["pci 0000:00:00.0: [8086:29c0]", "pci 0000:00:01.0: [1af4:1042]", "pci 0000:00:02.0: [1af4:1041]",
                          "Run /init as init process"] {
            try #require(run.waitFor(milestone, after: banner, seconds: 400) != nil, "missing \"\(milestone)\":\n\(run.tail)")
        }
        #expect(!run.text.contains("conflicts with"), "overlapping BARs:\n\(run.text)")
        // The drivers, loaded by /init: the disk read through its queue (the partition scan
        // needs completions, i.e. MSI-X), then the NIC.
        let vda = run.waitFor("virtio_blk virtio0: [vda] 2048 512-byte logical blocks", after: banner, seconds: 300)
        try #require(vda != nil, "virtio_blk did not report the disk:\n\(run.tail)")
        #expect(run.waitFor("swiftvisor-init: network interface eth0", after: vda, seconds: 300) != nil, "no eth0:\n\(run.tail)")
        #expect(!run.text.contains("Kernel panic"), "\(run.tail)")
        #expect(!run.text.contains("swiftvisor-init: insmod"), "a module did not load:\n\(run.tail)")
    }
}
