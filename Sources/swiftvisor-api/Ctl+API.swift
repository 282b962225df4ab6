import ArgumentParser
import FoundationEssentials
import OperatorAPI
import SwiftvisorCLI
import VMM
#if canImport(Glibc)
import Glibc
#endif

extension Ctl {
    /// Sends the action to the VM and prints what it answers.
    func drive() throws {
        switch action {
        case "status":
            let info = try CtlRequests.call(apiSock, "GET", "/").decodeOrFail(InstanceInfo.self)
            var line = "\(info.state): \(info.guest ?? "no guest yet"), engine \(info.engine ?? "not chosen"), \(info.vcpus) vCPU, "
                + "\(info.memoryBytes >> 20) MiB, up \(info.uptimeSeconds.fixed(1)) s"
            if let reason = info.stopReason { line += " (\(reason))" }
            print(line)
        case "start": try simple("PUT", "/actions", ActionRequest(actionType: "InstanceStart"), done: "started")
        case "pause": try simple("PATCH", "/vm", VMStateRequest(state: "Paused"), done: "paused")
        case "resume": try simple("PATCH", "/vm", VMStateRequest(state: "Resumed"), done: "resumed")
        case "stop": try simple("PUT", "/actions", ActionRequest(actionType: "Stop"), done: "stopped")
        case "metrics":
            print(try CtlRequests.call(apiSock, "GET", "/metrics").text, terminator: "")
        case "snapshot": try delegate(to: SnapshotCommand.Create.self)
        case "balloon": try delegate(to: BalloonCommand.self)
        case "migrate": try delegate(to: MigrateCommand.self)
        default:
            throw ValidationError("unknown action '\(action)' (status, start, pause, resume, stop, snapshot, balloon, metrics, migrate)")
        }
    }

    private func simple(_ method: String, _ path: String, _ body: some Encodable, done: String) throws {
        _ = try CtlRequests.call(apiSock, method, path, json: body)
        print(done)
    }

    /// Runs the command that has the action's own options (`swiftvisor snapshot create` …) on this socket.
    private func delegate<Command: ParsableCommand>(to: Command.Type) throws {
        var command = try Command.parse(["--socket", apiSock] + arguments)
        try command.run()
    }
}

/// The requests the CLI's commands send; a transport failure or an error answer prints one
/// line and exits 125.
enum CtlRequests {
    static func call(_ socket: String, _ method: String, _ path: String, json body: (some Encodable)? = Optional<String>.none) throws -> APIClientResponse {
        try answer { try APIClient(socketPath: socket).send(method, path, json: body) }
    }

    /// The answer `exchange` got, when it is a success; a transport failure or an error
    /// answer is one line and exit 125. Every request of the CLI goes through here.
    private static func answer(_ exchange: () throws -> APIClientResponse) throws -> APIClientResponse {
        let response: APIClientResponse
        do { response = try exchange() } catch { throw fail("\(error)") }
        guard response.status < 300 else { throw fail("\(response.faultMessage) (HTTP \(response.status))") }
        return response
    }

    /// Prints the error line; the exit status to throw.
    static func fail(_ message: String) -> ExitCode {
        printError("swiftvisor: error: " + message)
        return ExitCode(ToolStatus.failure)
    }

    /// Snapshots the VM into `file` (made absolute here: the VM's working directory may differ).
    static func snapshot(socket: String, file: String, note: String) throws -> SnapshotReport {
        let absolute = file.hasPrefix("/") ? file : FileManager.default.currentDirectoryPath + "/" + file
        return try call(socket, "PUT", "/snapshot/create", json: SnapshotCreateRequest(snapshotPath: absolute, note: note))
            .decodeOrFail(SnapshotReport.self)
    }

    /// The balloon's state after setting its target to `targetPages` (if given).
    static func balloon(socket: String, targetPages: UInt32?) throws -> BalloonInfo {
        if let targetPages {
            return try call(socket, "PATCH", "/balloon", json: BalloonRequest(targetPages: targetPages)).decodeOrFail(BalloonInfo.self)
        }
        return try call(socket, "GET", "/balloon").decodeOrFail(BalloonInfo.self)
    }

    /// Runs a migration, handing each progress line to `progress`; returns the final line.
    static func migrate(socket: String, _ request: MigrateRequest, progress: (MigrationProgress) -> Void) throws -> MigrationControlLine? {
        let decoder = JSONDecoder()
        decoder.keyDecodingStrategy = .convertFromSnakeCase
        var final: MigrationControlLine?
        _ = try answer {
            try APIClient(socketPath: socket).stream("PUT", "/migrate", json: request) { text in
                guard let line = try? decoder.decode(MigrationControlLine.self, from: Data(text.utf8)) else {
                    printError("swiftvisor: unexpected line from the VM: \(text)")
                    return
                }
                if let p = line.progress { progress(p) }
                if line.isFinal { final = line }
            }
        }
        return final
    }
}

extension APIClientResponse {
    /// The body decoded, or one line and exit 125.
    func decodeOrFail<T: Decodable>(_ type: T.Type) throws -> T {
        do { return try decode(type) } catch { throw CtlRequests.fail("unexpected answer from the VM: \(text)") }
    }
}
