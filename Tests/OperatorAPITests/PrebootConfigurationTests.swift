import Foundation
import OperatorAPI
import TestSupport
import Testing
import VMM
#if canImport(Glibc)
import Glibc
#endif

/// A `serve`-style instance (no VM until InstanceStart) on a fresh socket.
struct ServedInstance {
    let controller: VMController
    let server: APIServer
    let client: APIClient
    let capture = SerialCapture()

    init() throws {
        let capture = self.capture
        controller = VMController(serialOutput: { capture.append($0) })
        let path = socketPath("serve")
        server = try APIServer(endpoint: .unix(path: path), router: APIRouter(controller: controller))
        client = APIClient(socketPath: path)
    }
}

@Suite struct PrebootConfigurationTests {
    /// A drive configured through the API is the guest's virtio-blk disk.
    @Test func aConfiguredDriveIsTheGuestsDisk() throws {
        let image = NSTemporaryDirectory() + "sv-api-disk-\(getpid()).img"
        var bytes = [UInt8](repeating: 0, count: 16 * 512)
        bytes.replaceSubrange(0..<21, with: Array("configured over HTTP\n".utf8))
        try Data(bytes).write(to: URL(fileURLWithPath: image))
        defer { unlink(image) }
        let vm = try ServedInstance()
        defer { vm.server.close() }
        #expect(try vm.client.send("PUT", "/machine-config", json: MachineConfigRequest(memSizeMib: 32, engine: "software")).status == 204)
        #expect(try vm.client.send("PUT", "/boot-source", json: BootSourceRequest(guest: "disk")).status == 204)
        #expect(try vm.client.send("PUT", "/drives/rootfs", json: DriveRequest(pathOnHost: image)).status == 204)
        let mismatch = try vm.client.send("PUT", "/drives/rootfs", json: ["drive_id": "other", "path_on_host": image])
        #expect(mismatch.status == 400 && mismatch.faultMessage.contains("differs"))
        #expect(try vm.client.send("PUT", "/actions", json: ActionRequest(actionType: "InstanceStart")).status == 204)
        let result = try #require(vm.controller.waitUntilFinished())
        #expect(result.stopReason == .exitPort(status: 0))
        #expect(vm.capture.text.contains("disk: sector 0: configured over HTTP"))
        let data = try Data(contentsOf: URL(fileURLWithPath: image))
        #expect(String(decoding: data[512..<556], as: UTF8.self) == "written by the disk guest through virtio-blk")
        let info = try vm.client.send("GET", "/").decode(InstanceInfo.self)
        #expect(info.state == "Stopped" && info.stopReason != nil)
    }

    /// PUT /snapshot/load with resume_vm: the instance runs the snapshot's VM, which counts
    /// on from where the snapshot was taken.
    @Test func aLoadedSnapshotRunsOnFromItsPoint() throws {
        // A limit far enough that the source still runs when the snapshot is taken, however
        // fast the host (400 counts could end first, and a snapshot of the ended VM halts).
        let source = try APIServedGuest(commandLine: "limit=20000 work=50000")
        #expect(waitUntil { source.capture.text.contains("count 20\n") })
        let file = NSTemporaryDirectory() + "sv-api-load-\(getpid()).snap"
        defer { unlink(file) }
        #expect(try source.client.send("PUT", "/snapshot/create", json: SnapshotCreateRequest(snapshotPath: file)).status == 200)
        source.stop()

        let vm = try ServedInstance()
        defer { vm.server.close() }
        let missing = try vm.client.send("PUT", "/snapshot/load", json: SnapshotLoadRequest(snapshotPath: file + ".missing"))
        #expect(missing.status == 400)
        #expect(try vm.client.send("PUT", "/snapshot/load", json: SnapshotLoadRequest(snapshotPath: file, resumeVm: true)).status == 204)
        let result = try #require(vm.controller.waitUntilFinished())
        #expect(result.stopReason == .exitPort(status: 0))
        #expect(vm.capture.text.hasSuffix("count 20000\n"))
        #expect(!vm.capture.text.contains("count 20\n"), "it starts after the snapshot point")
    }
}
