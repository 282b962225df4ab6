import ArgumentParser
import VMM
#if canImport(Glibc)
import Glibc
#endif

/// What needs the operator API's libraries (SwiftNIO, swift-prometheus): `serve`, `ctl`,
/// `balloon`, `migrate`, `snapshot create`, and `run` / `snapshot restore` with an API socket or
/// a metrics file. It lives in the sibling executable `swiftvisor-api`, so that `swiftvisor` —
/// and `run` without `--api-sock` — does not pay for those libraries at start-up (the loader's
/// relocations and the Swift runtime's conformance scans grow with the binary). Both
/// executables parse the same commands (this module); `swiftvisor` validates, then hands these
/// over by exec with the same arguments.
package protocol OperatorImplementation: Sendable {
    /// Carries out `serve`, `ctl`, `balloon`, `migrate` or `snapshot create`.
    func run(_ command: any ParsableCommand) throws
    /// Starts what `options` ask for beside `machine` (API servers, metrics file); the
    /// returned closure ends it when the machine has stopped.
    func startSession(_ options: OperatorOptions, machine: Machine) throws -> () -> Void
}

package enum OperatorCommands {
    /// Set by swiftvisor-api's entry point before parsing; nil in `swiftvisor`.
    // SAFETY: written once at process start, before any command runs or thread starts.
    nonisolated(unsafe) package static var implementation: (any OperatorImplementation)?

    /// The sibling executable's name, looked for beside this one.
    package static let siblingName = "swiftvisor-api"

    /// Carries out an operator command here, or hands the process over to swiftvisor-api.
    static func run(_ command: some ParsableCommand) throws {
        guard let implementation else { try handOver() }
        try implementation.run(command)
    }

    /// What starts a machine's operator session: nothing when `options` ask for none; in
    /// `swiftvisor`, when they do, the process becomes swiftvisor-api (before any VM exists).
    static func sessionStarter(_ options: OperatorOptions) throws -> (Machine) throws -> () -> Void {
        guard options.serves || options.metricsFile != nil else { return { _ in {} } }
        guard let implementation else { try handOver() }
        return { machine in try implementation.startSession(options, machine: machine) }
    }

    /// Replaces this process by swiftvisor-api from the same directory, same arguments; one
    /// line and exit 125 if it cannot. (Also for the attestation commands: AttestationCommands.swift.)
    static func handOver() throws -> Never {
        let path = directoryOfThisExecutable() + siblingName
        _ = execv(path, CommandLine.unsafeArgv)
        let reason = String(cString: strerror(errno))
        printError("swiftvisor: error: cannot start \(path) (\(reason)), which carries out the operator API's commands; build it with 'swift build -c release --product \(siblingName)'")
        throw ExitCode(ToolStatus.failure)
    }

    /// "/dir/" of /proc/self/exe (argv[0] may be a bare name found on PATH).
    private static func directoryOfThisExecutable() -> String {
        var buffer = [CChar](repeating: 0, count: Int(PATH_MAX) + 1)
        let n = readlink("/proc/self/exe", &buffer, buffer.count - 1)
        guard n > 0 else { return "./" }
        let path = String(decoding: buffer[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)
        guard let slash = path.lastIndex(of: "/") else { return "./" }
        return String(path[...slash])
    }
}
