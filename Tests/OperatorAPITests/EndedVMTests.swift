import Foundation
import OperatorAPI
import TestSupport
import Testing
import VirtCore
import VMM

/// The API of a VM whose guest has ended (`run --api-sock` serves until the run has wound
/// down, and on through a broken post-copy migration): snapshot, pause and resume are wrong-state
/// requests, answered 409 with a fault message, and no snapshot file appears.
@Suite struct EndedVMTests {
    @Test func snapshotPauseAndResumeOfAnEndedVMAreRefused() throws {
        let run = try runGuest("hello", engine: .software)
        #expect(run.result.stopReason == .exitPort(status: 0))
        let path = socketPath("ended")
        let server = try APIServer(endpoint: .unix(path: path), router: APIRouter(controller: VMController(running: run.machine)))
        defer { server.close() }
        let client = APIClient(socketPath: path)
        let target = NSTemporaryDirectory() + "sv-ended-\(getpid()).snap"
        defer { unlink(target) }

        let snapshot = try client.send("PUT", "/snapshot/create", json: SnapshotCreateRequest(snapshotPath: target))
        #expect(snapshot.status == 409, "\(snapshot.text)")
        #expect(snapshot.faultMessage.contains("already ended: guest exited with status 0"), "\(snapshot.text)")
        #expect(!FileManager.default.fileExists(atPath: target))
        for state in ["Paused", "Resumed"] {
            let r = try client.send("PATCH", "/vm", json: VMStateRequest(state: state))
            #expect(r.status == 409 && r.faultMessage.contains("already ended"), "\(state): \(r.text)")
        }
        #expect(!run.machine.isPaused)
        let info = try client.send("GET", "/").decode(InstanceInfo.self)
        #expect(info.state == "Stopped" && info.stopReason == "guest exited with status 0")
    }
}
