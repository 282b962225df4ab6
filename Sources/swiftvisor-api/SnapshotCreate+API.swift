import OperatorAPI
import SwiftvisorCLI
import VirtCore

extension SnapshotCommand.Create {
    /// Snapshots the running VM through its API.
    func createSnapshot() throws {
        let r = try CtlRequests.snapshot(socket: socket, file: file, note: note)
        print("snapshot \(file): " + "\((Double(r.fileBytes) / 1048576).fixed(1)) MiB, "
            + "guest paused \((r.pauseSeconds * 1000).fixed(2)) ms, total \((r.totalSeconds * 1000).fixed(1)) ms, "
            + "\(r.copyOnWriteFaults) copy-on-write faults (\(r.mechanism))")
    }
}
