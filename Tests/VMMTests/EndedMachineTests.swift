import Foundation
import TestSupport
import Testing
import VirtCore
@testable import VMM

/// A machine whose guest has ended has nothing left to snapshot: a snapshot of it used to be
/// written anyway (registers and RAM of a guest that will never run again).
@Suite struct EndedMachineTests {
    @Test(arguments: TestEngines.available)
    func aMachineWhoseGuestExitedIsNotSnapshotted(engine: EngineChoice) throws {
        let run = try runGuest("hello", engine: engine)
        #expect(run.result.stopReason == .exitPort(status: 0))
        let dir = ScratchDirectory()
        let path = dir.file("ended.snap")
        #expect {
            _ = try run.machine.snapshot(to: path)
        } throws: { "\($0)".contains("already ended (guest exited with status 0)") }
        #expect(!FileManager.default.fileExists(atPath: path))
    }

    @Test func aMachineStoppedByTheHostIsNotSnapshotted() throws {
        let capture = SerialCapture()
        let machine = try bundledMachine("counter", engine: .software, memory: 64 << 20,
                                         commandLine: "limit=100000000 work=20000", capture: capture)
        let runner = HostThread(name: "counter") { _ = try? machine.run() }
        #expect(waitUntil { capture.text.contains("count 2\n") })
        machine.stop()
        runner.join()
        let dir = ScratchDirectory()
        #expect {
            _ = try machine.snapshot(to: dir.file("stopped.snap"))
        } throws: { "\($0)".contains("already ended (stopped by the host)") }
    }

    /// Nor migrated: the destination would receive a guest that never runs again.
    @Test func aMachineWhoseGuestExitedIsNotMigrated() throws {
        let run = try runGuest("hello", engine: .software)
        let incoming = try IncomingMigration(listeningOn: .tcp(host: "127.0.0.1", port: 0),
                                             options: IncomingMigrationOptions(engine: try TestEngines.make(.software)))
        defer { incoming.close() }
        #expect {
            _ = try run.machine.migrate(to: incoming.address)
        } throws: { "\($0)".contains("already ended (guest exited with status 0)") }
    }
}
