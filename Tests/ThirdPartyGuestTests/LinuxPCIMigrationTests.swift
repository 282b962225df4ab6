import Foundation
import Synchronization
import TestSupport
import Testing
import VMM
import VirtCore

/// Live migration of a Linux VM whose disk is on virtio-pci: Debian's kernel with a
/// read-only virtio-blk disk (the ext4 image of `Scripts/linux-rootfs-guest.sh`; shared
/// locks let both halves of an in-process migration open it) moves between two machines of
/// this process at its shell prompt; the destination's shell answers, and its kernel reads a
/// block of the disk it never read before — the request reaches the device through the BAR
/// the guest programmed and its completion comes back as the MSI-X message the guest set up.
@Suite(.serialized, .enabled(if: LinuxRootDiskGuest.available, LinuxRootDiskGuest.skipReason))
struct LinuxPCIMigrationTests {
    /// The last 4 KiB block of `image` that is not all zeros (the kernel's probe reads only
    /// the start of the disk), and its first 16 bytes.
    private func farBlock(of image: String) throws -> (index: Int, head: [UInt8]) {
        let bytes = [UInt8](try Data(contentsOf: URL(fileURLWithPath: image)))
        let blocks = bytes.count / 4096
        let index = try #require((blocks / 2..<blocks).reversed().first { b in bytes[b * 4096..<(b + 1) * 4096].contains { $0 != 0 } },
                                 "no data in the second half of \(image)")
        return (index, Array(bytes[index * 4096..<index * 4096 + 16]))
    }

    @Test func aLinuxVMWithAVirtioPCIDiskMigratesAndReadsItThere() throws {
        let files = try LinuxRootDiskGuest.prepared.get()
        let image = try #require(files.outputs["rootfs"])
        let block = try farBlock(of: image)
        let source = try LinuxMachine(files, name: "pci-mig-src") { try $0.addVirtioPCIBlock(path: image, readOnly: true) }
        defer { source.stop() }
        var at = source.prompt(after: nil, seconds: 400)
        try #require(at != nil, "no shell prompt:\n\(source.tail)")
        at = source.answer("echo before-$((6*7))", expecting: "before-42", after: at)
        try #require(at != nil, "the source's shell did not answer:\n\(source.tail)")
        try #require(source.prompt(after: at) != nil, "\(source.tail)")

        let incoming = try IncomingMigration(listeningOn: .tcp(host: "127.0.0.1", port: 0),
                                             options: IncomingMigrationOptions(engine: try TestEngines.make(.software)))
        defer { incoming.close() }
        let arrived = Mutex<Result<LinuxMachine, any Error>?>(nil)
        let receiver = HostThread(name: "pci-mig-dst") {
            let result = Result { try LinuxMachine(name: "pci-mig-dst") { output in try incoming.receiveOne(serialOutput: output, waitSeconds: 120).0 } }
            arrived.withLock { $0 = result }
        }
        let report = try source.machine.migrate(to: incoming.address)
        receiver.join()
        let destination = try #require(arrived.withLock { $0 }).get()
        defer { destination.stop() }
        print("LinuxPCIMigrationTests: \(report.pagesSent) pages in \(report.rounds) rounds, downtime \(String(format: "%.1f", report.downtimeSeconds * 1000)) ms (software engine)")
        _ = waitUntil(seconds: 60) { !source.isRunning }
        #expect(try source.ended?.get() == .migrated(destination: incoming.address.description))
        #expect(destination.machine.pcPCI?.virtioTransports.count == 1)

        let hex = block.head.map { String(format: "%02x", $0) }.joined(separator: " ")
        var there = destination.answer("dd if=/dev/vda bs=4096 skip=\(block.index) count=1 2>/dev/null|od -An -tx1 -N16",
                                       expecting: hex, after: nil)
        try #require(there != nil, "the destination did not read block \(block.index) (\(hex)):\n\(destination.tail)")
        there = destination.prompt(after: there)
        try #require(there != nil, "\(destination.tail)")
        destination.type("poweroff")
        #expect(destination.waitFor("reboot: Power down", after: there, seconds: 120) != nil, "\(destination.tail)")
        _ = waitUntil(seconds: 120) { !destination.isRunning }
        #expect(try destination.ended?.get() == .exitPort(status: 0), "\(destination.tail)")
    }
}
