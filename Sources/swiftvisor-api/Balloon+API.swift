import OperatorAPI
import SwiftvisorCLI
import VirtCore

extension BalloonCommand {
    /// Sets or reports the balloon through the API.
    func setBalloon() throws {
        let target = pages ?? mib.map { $0 * 256 }
        let b = try CtlRequests.balloon(socket: socket, targetPages: target)
        print("balloon: target \(b.targetPages) pages (\(b.targetPages / 256) MiB), guest has given \(b.actualPages) pages; host holds "
              + "\((Double(b.hostBytes) / 1048576).fixed(1)) MiB of the VM's RAM")
    }
}
