import ArgumentParser
import Dispatch
import FoundationEssentials
import Logging
import VMM
import VirtCore
#if canImport(Glibc)
import Glibc
#endif

extension Run {
    /// `run --incoming ADDRESS`: waits for a migrating VM, then runs it as `run` would.
    func runIncoming(_ text: String, logger: Logger, startSession: (Machine) throws -> () -> Void) throws {
        let address: MigrationAddress
        do { address = try MigrationAddress(parsing: text) } catch { throw ValidationError("--incoming: \(error)") }
        let engine: any VirtCore.Engine
        do {
            engine = try self.engine.map { try EngineSelection.make($0, kvmPath: kvmPath, translation: !noTranslation) }
                ?? EngineSelection.makeDefault(kvmPath: kvmPath, translation: !noTranslation) { logger.notice("\($0)") }
        } catch {
            printError("swiftvisor: error: \(error)")
            throw ExitCode(ToolStatus.failure)
        }
        var options = IncomingMigrationOptions(engine: engine, memoryLimit: memorySpecified ? memory.bytes : nil,
                                               expectedGuest: guests.first.map { Self.split($0).0 })
        options.machineTimeoutSeconds = timeout
        if prealloc { options.preallocateBytes = memory.bytes }
        let incoming: IncomingMigration
        do { incoming = try IncomingMigration(listeningOn: address, options: options) } catch {
            printError("swiftvisor: error: \(error)")
            throw ExitCode(ToolStatus.failure)
        }
        logger.notice("waiting for a migration at \(incoming.address) (engine \(engine.name))")
        let machine: Machine
        do {
            let (m, report) = try incoming.receive(serialOutput: ConsoleOutput.write) { error in
                logger.warning("incoming migration failed, waiting for another: \(error)")
            }
            machine = m
            logger.notice("received \(report.memorySize >> 20) MiB from the \(report.sourceEngine) engine (\(report.pagesReceived) pages, \(report.rounds) rounds\(report.intoPreallocatedMemory ? ", into preallocated RAM" : "")); running on \(report.engine)")
        } catch {
            printError("swiftvisor: error: \(error)")
            throw ExitCode(ToolStatus.failure)
        }
        let endSession = try startSession(machine)
        defer { endSession() }
        let uart = machine.uart
        ConsoleInput.start { uart.enqueueInput($0) }
        let result: RunResult
        do { result = try machine.run() } catch {
            printError("swiftvisor: error: \(error)")
            throw ExitCode(ToolStatus.failure)
        }
        incoming.close()
        report(result, machine: machine, label: "", jsonPath: statsJSON)
        let status = exitStatus(result.stopReason, label: "")
        if status != 0 { throw ExitCode(status) }
    }
}
