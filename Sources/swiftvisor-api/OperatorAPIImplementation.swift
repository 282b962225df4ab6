import ArgumentParser
import SwiftvisorCLI
import VMM

/// The operator commands, carried out with SwiftNIO, swift-log and swift-prometheus.
struct OperatorAPIImplementation: OperatorImplementation {
    func run(_ command: any ParsableCommand) throws {
        switch command {
        case let serve as Serve: try serve.serveAPI()
        case let ctl as Ctl: try ctl.drive()
        case let balloon as BalloonCommand: try balloon.setBalloon()
        case let migrate as MigrateCommand: try migrate.migrate()
        case let create as SnapshotCommand.Create: try create.createSnapshot()
        default: fatalError("swiftvisor-api has no implementation for \(type(of: command))")
        }
    }

    func startSession(_ options: OperatorOptions, machine: Machine) throws -> () -> Void {
        let session = try OperatorSession(options, machine: machine)
        return { session.finish() }
    }
}
