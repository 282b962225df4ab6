import Foundation
import OperatorAPI
import TestSupport
import Testing
import VMM

/// `snapshot create` and `ctl pause|resume` against the API of a VM whose guest has ended:
/// one clear line and exit 125, and no snapshot file (one used to be written).
@Suite struct CLIEndedVMTests {
    @Test func snapshotAndPauseOfAnEndedVMAreOneClearLine() throws {
        let run = try runGuest("hello", engine: .software)
        let socket = apiSocketPath("ended")
        let server = try APIServer(endpoint: .unix(path: socket), router: APIRouter(controller: VMController(running: run.machine)))
        defer { server.close() }
        let target = NSTemporaryDirectory() + "sv-cli-ended-\(getpid()).snap"
        defer { unlink(target) }

        let snapshot = try swiftvisor(["snapshot", "create", "--socket", socket, target])
        #expect(snapshot.status == 125, "\(snapshot)")
        #expect(snapshot.stderr == "swiftvisor: error: PUT /snapshot/create needs a running VM (the VM has already ended: guest exited with status 0) (HTTP 409)\n")
        #expect(!FileManager.default.fileExists(atPath: target))
        for action in ["pause", "resume"] {
            let r = try swiftvisor(["ctl", "--api-sock", socket, action])
            #expect(r.status == 125 && r.stdout.isEmpty, "\(action): \(r)")
            #expect(r.stderr.contains("already ended") && r.stderr.filter { $0 == "\n" }.count == 1, "\(action): \(r.stderr)")
        }
    }
}
