import Devices
import GuestImages
import Testing
import VirtCore
import VMM

/// A bundled guest's machine on `engine`, its serial output going to `capture`.
public func bundledMachine(_ name: String, engine: EngineChoice, vcpus: Int = 1, memory: UInt64 = 32 << 20,
                           commandLine: String = "", timeout: Double = 120, recordExits: Bool = false,
                           confidential: ConfidentialMode? = nil, workingSetPages: Int = 1024,
                           capture: SerialCapture) throws -> Machine {
    let guest = try #require(BundledGuests.named(name), "bundled guest \(name)")
    var configuration = MachineConfiguration(memorySize: memory, vcpuCount: vcpus, commandLine: commandLine,
                                             timeoutSeconds: timeout, recordExits: recordExits)
    configuration.confidential = confidential
    configuration.workingSetPages = workingSetPages
    return try Machine(image: try ELFImage(bytes: guest.elf), configuration: configuration,
                       engine: try TestEngines.make(engine), serialOutput: capture.append)
}

/// What one run of a bundled guest left behind.
public struct GuestRun {
    public var machine: Machine
    public var result: RunResult
    public var output: String
}

/// Runs a bundled guest to its end on `engine`, with `input` queued on its serial port.
public func runGuest(_ name: String, engine: EngineChoice, vcpus: Int = 1, memory: UInt64 = 32 << 20, commandLine: String = "",
                     input: String? = nil, timeout: Double = 60, recordExits: Bool = false,
                     confidential: ConfidentialMode? = nil, workingSetPages: Int = 1024) throws -> GuestRun {
    let capture = SerialCapture()
    let machine = try bundledMachine(name, engine: engine, vcpus: vcpus, memory: memory, commandLine: commandLine,
                                     timeout: timeout, recordExits: recordExits, confidential: confidential,
                                     workingSetPages: workingSetPages, capture: capture)
    if let input { machine.uart.enqueueInput(Array(input.utf8)) }
    let result = try machine.run()
    return GuestRun(machine: machine, result: result, output: capture.text)
}
