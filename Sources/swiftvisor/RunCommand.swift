import ArgumentParser
import Foundation
import Devices
import GuestImages
import VMM
import VirtCore
#if canImport(Glibc)
import Glibc
#endif

struct Run: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Boot a guest and stream its serial console.",
        discussion: """
            GUEST is a bundled guest's name (see 'swiftvisor guests') or a path to a static
            ELF64 x86-64 executable linked at 1 MiB (docs/guest-abi.md). The guest's COM1
            output goes to standard output and standard input is fed to COM1. swiftvisor
            exits with the status the guest writes to port 0xF4; 124 on --timeout; 125 if
            the VM failed (triple fault, engine error, bad image).
            """
    )

    @Argument(help: "Bundled guest name or path to an ELF file.")
    var guest: String

    @Option(name: .long, help: ArgumentHelp("Guest RAM, e.g. 64M, 1G (2M–3G, multiple of 2M).", valueName: "size"))
    var memory = MemoryArgument(argument: "64M")!

    @Option(name: .long, help: ArgumentHelp("Number of vCPUs.", valueName: "n"))
    var vcpus = 1

    @Option(name: .long, help: "Execution engine: kvm (hardware) or software (interpreter). Default: kvm when /dev/kvm is usable, otherwise software.")
    var engine: EngineChoice?

    @Option(name: .long, help: ArgumentHelp("Stop the guest after this many seconds.", valueName: "seconds"))
    var timeout: Double?

    @Option(name: .long, help: ArgumentHelp("Command line passed to the guest, e.g. 'count=1000 ring=3'.", valueName: "text"))
    var cmdline = ""

    @Flag(name: .long, help: "Print the exit statistics table to standard error when the guest stops.")
    var stats = false

    @Option(name: .long, help: ArgumentHelp("Write the exit statistics as JSON to this file.", valueName: "path"))
    var statsJSON: String?

    @Option(name: .long, help: .hidden)
    var kvmPath = "/dev/kvm"

    func validate() throws {
        guard (1...BootLayout.maxVCPUs).contains(vcpus) else {
            throw ValidationError("--vcpus must be between 1 and \(BootLayout.maxVCPUs)")
        }
        if let t = timeout, !(t > 0) { throw ValidationError("--timeout must be a positive number of seconds") }
    }

    func run() throws {
        let machine: Machine
        do {
            let image = try GuestProgram.load(guest)
            let engine = try self.engine.map { try EngineSelection.make($0, kvmPath: kvmPath) }
                ?? EngineSelection.makeDefault(kvmPath: kvmPath) { printError("swiftvisor: \($0)") }
            let config = MachineConfiguration(memorySize: memory.bytes, vcpuCount: vcpus, commandLine: cmdline,
                                              timeoutSeconds: timeout)
            machine = try Machine(image: image, configuration: config, engine: engine, serialOutput: ConsoleOutput.write)
        } catch {
            printError("swiftvisor: error: \(error)")
            throw ExitCode(ToolStatus.failure)
        }
        ConsoleInput.start(feeding: machine.uart)
        let result: RunResult
        do {
            result = try machine.run()
        } catch {
            printError("swiftvisor: error: \(error)")
            throw ExitCode(ToolStatus.failure)
        }
        if stats {
            printError(result.statistics.table(portName: { machine.bus.deviceName(port: $0) ?? "" },
                                               rangeName: { machine.bus.deviceName(mmioBase: $0) ?? "unassigned" }))
            printError("wall time: \(ExitStatistics.formatNanoseconds(Double(result.wallNanoseconds))), engine: \(machine.engine.name)")
        }
        if let path = statsJSON {
            let json = "{\"engine\":\"\(machine.engine.name)\",\"wall_ns\":\(result.wallNanoseconds),\"stop\":\"\(result.stopReason.summary)\",\"exits\":\(result.statistics.json)}\n"
            do { try writeFile(path, json) } catch { printError("swiftvisor: error: cannot write \(path): \(error)") }
        }
        switch result.stopReason {
        case let .exitPort(status):
            throw ExitCode(Int32(status))
        case .allHalted:
            printError("swiftvisor: \(result.stopReason.summary)")
        case .timeout:
            printError("swiftvisor: guest \(result.stopReason.summary) after \(timeout ?? 0) s")
            throw ExitCode(ToolStatus.timeout)
        case let .shutdown(vcpu, state):
            printError("swiftvisor: vCPU \(vcpu) shut down (triple fault)")
            if let state { printError(state.dump) }
            throw ExitCode(ToolStatus.failure)
        case .engineFailure, .stopped:
            printError("swiftvisor: error: \(result.stopReason.summary)")
            throw ExitCode(ToolStatus.failure)
        }
    }
}

/// COM1 → standard output, byte by byte as the guest writes (interactive, unbuffered).
enum ConsoleOutput {
    @Sendable static func write(_ byte: UInt8) {
        var b = byte
        while Glibc.write(1, &b, 1) < 0 && errno == EINTR {}
    }
}

/// Standard input → COM1, on a background thread that ends at end of input.
enum ConsoleInput {
    static func start(feeding uart: UART16550) {
        let thread = Thread { readLoop(uart) }
        thread.start()
    }

    private static func readLoop(_ uart: UART16550) {
        var buffer = [UInt8](repeating: 0, count: 256)
        while true {
            let n = buffer.withUnsafeMutableBytes { read(0, $0.baseAddress, $0.count) }
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { return }
            uart.enqueueInput(buffer[0..<n])
        }
    }
}

func writeFile(_ path: String, _ text: String) throws {
    let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
    guard fd >= 0 else { throw POSIXError(errno) }
    defer { close(fd) }
    var t = text
    try t.withUTF8 { buf in
        var off = 0
        while off < buf.count {
            let n = Glibc.write(fd, buf.baseAddress! + off, buf.count - off)
            if n < 0 { if errno == EINTR { continue }; throw POSIXError(errno) }
            off += n
        }
    }
}

struct POSIXError: Error, CustomStringConvertible {
    let code: Int32
    init(_ code: Int32) { self.code = code }
    var description: String { String(cString: strerror(code)) }
}
