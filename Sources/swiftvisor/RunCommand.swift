import ArgumentParser
import FoundationEssentials
import Devices
import Logging
import GuestImages
import VMM
import Synchronization
import VirtCore
#if canImport(Glibc)
import Glibc
#endif

/// `run`: its options (filled by `Run.parse`, RunOptions.swift, from the option table there) and
/// what it does with them.
struct Run {
    static let abstract = "Boot one guest (or several, side by side) and stream the serial console."
    static let discussion = """
        GUEST is a bundled guest's name (see 'swiftvisor guests') or a path to a static \
        ELF64 x86-64 executable linked at 1 MiB (docs/guest-abi.md), optionally followed \
        by its own command line in the same argument: 'net-ping pong=1 count=5'. \
        Several GUESTs run as several VMs of this process with the same options; each \
        gets its own NICs and consoles (--net switch:NAME connects them). With more than one VM, \
        output lines are prefixed with [vm0], [vm1], …; standard input goes to vm0, and \
        --console-dir DIR serves each VM's console on DIR/vmN.sock. --kernel K --vms N \
        boots N VMs of one kernel the same way.

        Devices: --disk PATH[,ro][,vm=N] adds a virtio-blk disk backed by a raw image \
        file to vm0 (or vmN); the image is locked while in use; --net \
        switch:NAME adds a virtio-net NIC on the process-wide learning switch NAME; \
        --net tap:IFNAME puts it on a host TAP interface (needs CAP_NET_ADMIN); \
        --virtio-console adds a virtio console on standard output; --nic switch:NAME \
        adds the emulated register-interface NIC; --balloon adds virtio-balloon. With \
        --kernel, --disk, --net and --virtio-console attach over virtio-pci (modern, MSI-X).

        swiftvisor exits with the status the guest writes to port 0xF4 (with several \
        VMs: the first non-zero one); 124 on --timeout; 125 if a VM failed (triple \
        fault, engine error, bad image or device).
        """

    var guests: [String] = []
    var kernel: String?
    var cpu: String?
    var initrd: String?
    var memory = MemoryArgument(argument: "64M")!
    /// Whether --memory was given (with --incoming it limits what is accepted).
    var memorySpecified = false
    var vcpus = 1
    var engine: EngineChoice?
    var noTranslation = false
    var paging: PagingMode = .nested
    var timeout: Double?
    var cmdline = ""
    var disk: [String] = []
    var net: [String] = []
    var nic: [String] = []
    // The operator options (OperatorOptions for `serve` and `snapshot restore`).
    var apiSock: String?
    var apiTCP: String?
    var apiTokenFile: String?
    var metricsFile: String?
    var logLevel: Logger.Level = .info
    var incoming: String?
    var prealloc = false
    var balloon = false
    var partition: [String] = []
    var virtioConsole = false
    var vms = 1
    var consoleDir: String?
    var confidentialOptions = ConfidentialArguments()
    var stats = false
    var statsJSON: String?
    var kvmPath = "/dev/kvm"
    var startupReport: String?
    var crashAfterMs: Int?

    /// Whether an API server is asked for.
    var serves: Bool { apiSock != nil || apiTCP != nil }

    /// The operator options as `swiftvisor-api` takes them (built only when asked for).
    var operatorOptions: OperatorOptions {
        var options = OperatorOptions()
        options.apiSock = apiSock
        options.apiTCP = apiTCP
        options.apiTokenFile = apiTokenFile
        options.metricsFile = metricsFile
        options.logLevel = logLevel
        return options
    }

    func validate() throws {
        try memory.validateGuestRAM()
        if apiTCP != nil { try operatorOptions.validate() }
        try confidentialOptions.validate()
        if prealloc {
            guard incoming != nil, memorySpecified else { throw ValidationError("--prealloc needs --incoming and --memory (the RAM to allocate while waiting)") }
        }
        if incoming != nil {
            guard guests.count <= 1, disk.isEmpty, net.isEmpty, nic.isEmpty, !balloon, !virtioConsole else {
                throw ValidationError("--incoming takes at most one guest name and no device options: the devices come with the VM")
            }
            return
        }
        if kernel != nil {
            if let cpu { do { _ = try PCCPUFeatures(parsing: cpu) } catch { throw ValidationError("--cpu: \(error)") } }
            guard guests.isEmpty else { throw ValidationError("--kernel boots one kernel; name no guest with it") }
            guard nic.isEmpty, !balloon, !serves else {
                throw ValidationError("--kernel takes only --disk, --net and --virtio-console as devices (virtio-pci), and no control options")
            }
        } else {
            guard initrd == nil else { throw ValidationError("--initrd needs --kernel") }
            guard cpu == nil else { throw ValidationError("--cpu needs --kernel") }
            guard !guests.isEmpty else { throw ValidationError("name at least one guest") }
        }
        guard guests.count <= 16, (1...16).contains(vms) else { throw ValidationError("at most 16 VMs per run") }
        if vms != 1 && kernel == nil { throw ValidationError("--vms needs --kernel (for guests, name several GUESTs)") }
        guard (1...BootLayout.maxVCPUs).contains(vcpus) else {
            throw ValidationError("--vcpus must be between 1 and \(BootLayout.maxVCPUs)")
        }
        if let t = timeout, !(t > 0) { throw ValidationError("--timeout must be a positive number of seconds") }
        if noTranslation && engine == .kvm { throw ValidationError("--no-translation applies to the software engine, not kvm") }
        if paging == .shadow && engine != .software { throw ValidationError("--paging shadow needs --engine software (KVM always uses the host's nested paging)") }
        if serves && guests.count > 1 { throw ValidationError("--api-sock serves one VM; run one guest") }
        for d in disk where try DiskArgument(d).vm >= (kernel == nil ? guests.count : vms) {
            throw ValidationError("--disk \(d): there is no VM \(try DiskArgument(d).vm) (VMs are numbered from 0)")
        }
        for p in partition where try PartitionArgument(p).vm >= guests.count {
            throw ValidationError("--partition \(p): there is no VM \(try PartitionArgument(p).vm) (VMs are numbered from 0)")
        }
        for n in net + nic where NetworkAttachment(n) == nil {
            throw ValidationError("network attachment '\(n)' is not switch:NAME or tap:IFNAME")
        }
        guard disk.count + net.count + nic.count + (virtioConsole ? 1 : 0) <= BootLayout.maxDevices else {
            throw ValidationError("at most \(BootLayout.maxDevices) devices per VM")
        }
    }

    func run() throws {
        let startSession = try serves || metricsFile != nil ? OperatorCommands.sessionStarter(operatorOptions) : { _ in {} }
        let attachAttestationReport = try confidentialOptions.reportAttacher()
        StderrLogHandler.bootstrap(level: logLevel)
        let logger = Logger(label: "swiftvisor")
        if let incoming { return try runIncoming(incoming, logger: logger, startSession: startSession) }
        let many = (kernel == nil ? guests.count : vms) > 1
        var machines: [Machine] = []
        var consoleSockets: [ConsoleSocket] = []
        defer { consoleSockets.forEach { $0.close() } }
        var firstVirtioConsole: VirtioConsole?
        // Partitions' devices reach only their own VM's RAM, through the IOMMU.
        let isolation: DeviceAssignmentPlatform?
        do {
            isolation = partition.isEmpty ? nil : try DeviceAssignmentPlatform(virtualFunctions: 0)
            for (index, spec) in (kernel.map { Array(repeating: $0, count: vms) } ?? guests).enumerated() {
                let (name, guestCmdline) = kernel == nil ? Self.split(spec) : (spec, nil)
                let image = kernel == nil ? try GuestProgram.load(name) : nil
                let engineChoice = self.engine ?? (confidentialOptions.confidential ? .software : nil)
                let notice = { (message: String) in if index == 0 { logger.notice("\(message)") } }
                // A kernel runs mostly in ring 0, which a nested KVM emulates: measured before KVM is picked.
                let engine = try kernel != nil
                    ? EngineSelection.forKernel(requested: engineChoice, kvmPath: kvmPath, translation: !noTranslation, notice: notice)
                    : engineChoice.map { try EngineSelection.make($0, kvmPath: kvmPath, translation: !noTranslation) }
                        ?? EngineSelection.makeDefault(kvmPath: kvmPath, translation: !noTranslation, notice: notice)
                var config = MachineConfiguration(memorySize: memory.bytes, vcpuCount: vcpus, commandLine: guestCmdline ?? cmdline,
                                                  timeoutSeconds: timeout, guestName: name)
                if crashAfterMs != nil { config.tickSeconds = 0.01 }
                config.paging = paging
                config.confidential = confidentialOptions.mode
                config.workingSetPages = confidentialOptions.workingSet
                let policy = try partition.map(PartitionArgument.init).last { $0.vm == index }?.policy
                if let policy {
                    try Partitioning.check(policy, memoryBytes: memory.bytes)
                    config.vcpuThreadSetup = Partitioning.threadSetup(policy)
                }
                let consoleSocket = try consoleDir.map { try ConsoleSocket(path: ConsoleSocket.path(directory: $0, index: index)) }
                if let consoleSocket { consoleSockets.append(consoleSocket) }
                let output = ConsoleSocket.tee(many ? PrefixedOutput(prefix: "[vm\(index)] ").write : ConsoleOutput.write, consoleSocket)
                let machine: Machine
                if let image {
                    machine = try Machine(image: image, configuration: config, engine: engine, serialOutput: output)
                    try attachAttestationReport(machine, name)
                } else {
                    let modules = try initrd.map { [(bytes: try Self.readFile($0), commandLine: $0)] } ?? []
                    machine = try PCPlatform.machine(kernel: try Self.readFile(name), modules: modules, configuration: config,
                                                     engine: engine, cpu: try cpu.map { try PCCPUFeatures(parsing: $0) } ?? PCCPUFeatures(),
                                                     serialOutput: output)
                }
                consoleSocket?.start { [uart = machine.uart] in uart.enqueueInput($0) }
                if policy?.lockMemory == true { try Partitioning.lock(machine.memory) }
                let console = try addDevices(to: machine, index: index, output: output)
                if policy != nil { try isolation?.confineVirtioDevices(of: machine, name: "vm\(index)") }
                if index == 0 { firstVirtioConsole = console }
                machines.append(machine)
            }
        } catch {
            printError("swiftvisor: error: \(error)")
            throw ExitCode(ToolStatus.failure)
        }
        let endSession = try startSession(machines[0])
        defer { endSession() }
        // Standard input goes to vm0: its UART and, when present, its virtio console.
        let uart = machines[0].uart, virtioConsole = firstVirtioConsole
        ConsoleInput.start { bytes in
            uart.enqueueInput(bytes)
            virtioConsole?.receive(bytes)
        }
        let results = Mutex([RunResult?](repeating: nil, count: machines.count))
        let failures = Mutex([String]())
        let crashTrigger = crashAfterMs.map(CrashTrigger.init)?.onTick
        let runMachine = { @Sendable (index: Int, machine: Machine) in
            do {
                let r = try machine.run(onTick: index == 0 ? crashTrigger : nil)
                results.withLock { $0[index] = r }
            } catch {
                failures.withLock { $0.append("vm\(index): \(error)") }
            }
        }
        ProcessLifecycle.stoppingOnSignal(machines) {
            if machines.count == 1 {
                runMachine(0, machines[0])  // no extra thread for the common case
            } else {
                let threads = machines.enumerated().map { index, machine in HostThread(name: "vm\(index)") { runMachine(index, machine) } }
                threads.forEach { $0.join() }
            }
        }
        for machine in machines {
            for problem in machine.flushDevices() { failures.withLock { $0.append(problem) } }
        }
        if let socket = apiSock, case .migrated? = results.withLock({ $0[0] })?.stopReason {
            machines[0].waitWhileMigrating {
                printError("swiftvisor: post-copy broke after the switch-over; this process keeps the pages the destination lacks. Resume with: swiftvisor migrate --resume --socket \(socket) DESTINATION")
            }
        }
        for f in failures.withLock({ $0 }) { printError("swiftvisor: error: \(f)") }
        var status: Int32? = failures.withLock { $0.isEmpty } ? nil : ToolStatus.failure
        for (index, machine) in machines.enumerated() {
            guard let result = results.withLock({ $0[index] }) else { continue }
            let label = many ? "vm\(index): " : ""
            report(result, machine: machine, label: label, jsonPath: statsJSON.map { many ? "\($0).vm\(index)" : $0 })
            if ProcessLifecycle.stopSignal != nil, result.stopReason == .stopped { continue }  // said below
            let s = exitStatus(result.stopReason, label: label)
            if status == nil || status == 0 { status = s }
        }
        if stats, let iommu = isolation?.iommu {
            printError("IOMMU (partitions' devices): \(iommu.counters.translations) translations, \(iommu.faultLog.faults.count) faults")
        }
        if let signal = ProcessLifecycle.stopSignal {
            ProcessLifecycle.announceStop(signal)
            throw ExitCode(ProcessLifecycle.exitStatus(signal))
        }
        if let path = startupReport { try writeStartupReport(path, machines[0]) }
        if let status, status != 0 { throw ExitCode(status) }
    }

    private func writeStartupReport(_ path: String, _ machine: Machine) throws {
        guard let first = machine.bootMarker.firstWriteNanoseconds, let cpu = machine.bootMarker.cpuNanosecondsBeforeFirstWrite else {
            printError("swiftvisor: error: the guest never wrote the boot marker (port 0xF5)")
            throw ExitCode(ToolStatus.failure)
        }
        let report = StartupReport(firstInstructionMonotonicNanoseconds: first, cpuNanosecondsBeforeFirstInstruction: cpu,
                                   peakRSSBytes: StartupReport.peakRSS(), guestRAMBytes: machine.memory.allocatedBytes)
        try writeFile(path, String(decoding: try JSONEncoder().encode(report), as: UTF8.self))
    }

    static func readFile(_ path: String) throws -> [UInt8] {
        do { return [UInt8](try Data(contentsOf: URL(fileURLWithPath: path))) } catch {
            throw ValidationError("cannot read \(path): \(error)")
        }
    }

    /// "name rest of line" → (name, command line); no space → (name, nil).
    static func split(_ spec: String) -> (String, String?) {
        guard let space = spec.firstIndex(of: " ") else { return (spec, nil) }
        return (String(spec[..<space]), String(spec[spec.index(after: space)...]).trimmed)
    }

    /// Adds the devices the options ask for; returns the virtio console, if any.
    func addDevices(to machine: Machine, index: Int, output: @escaping @Sendable (UInt8) -> Void) throws -> VirtioConsole? {
        if kernel != nil { return try addPCIDevices(to: machine, index: index, output: output) }
        for d in disk {
            let arg = try DiskArgument(d)
            if arg.vm == index { try machine.addVirtioBlock(path: arg.path, readOnly: arg.readOnly) }
        }
        for n in net { try machine.addVirtioNet(attachment: NetworkAttachment(n)!) }
        for n in nic { try machine.addEmulatedNIC(backend: NetworkAttachment(n)!.makeBackend()) }
        if balloon { try machine.addVirtioBalloon() }
        guard virtioConsole else { return nil }
        return try machine.addVirtioConsole { bytes in bytes.forEach(output) }.device as? VirtioConsole
    }

    /// The PC platform's devices: virtio-pci, in the order disks, NICs, console.
    func addPCIDevices(to machine: Machine, index: Int, output: @escaping @Sendable (UInt8) -> Void) throws -> VirtioConsole? {
        for d in disk {
            let arg = try DiskArgument(d)
            if arg.vm == index { try machine.addVirtioPCIBlock(path: arg.path, readOnly: arg.readOnly) }
        }
        for n in net { try machine.addVirtioPCINet(attachment: NetworkAttachment(n)!) }
        guard virtioConsole else { return nil }
        return try machine.addVirtioPCIConsole { bytes in bytes.forEach(output) }.device as? VirtioConsole
    }

    func report(_ result: RunResult, machine: Machine, label: String, jsonPath: String?) {
        if stats {
            printError(label + result.statistics.table(portName: { machine.bus.deviceName(port: $0) ?? "" },
                                                       rangeName: { machine.bus.deviceName(mmioBase: $0) ?? "unassigned" }))
            printError("\(label)wall time: \(ExitStatistics.formatNanoseconds(Double(result.wallNanoseconds))), engine: \(machine.engine.name)")
            if let s = machine.executionCounts { printError(label + s.text) }
            if let p = machine.pagingReport { printError(label + p.text) }
        }
        if let path = jsonPath {
            struct Output: Encodable {
                var engine: String
                var wallNanoseconds: UInt64
                var stop: String
                var execution: ExecutionCounts?
                var exits: ExitStatistics.Report
            }
            let output = Output(engine: machine.engine.name, wallNanoseconds: result.wallNanoseconds, stop: result.stopReason.summary,
                                execution: machine.executionCounts, exits: result.statistics.report)
            do { try writeJSON(path, output) } catch { printError("swiftvisor: error: cannot write \(path): \(error)") }
        }
    }

    /// What the tool exits with for one VM's stop, after saying why on standard error.
    func exitStatus(_ reason: StopReason, label: String) -> Int32 {
        switch reason {
        case let .exitPort(status):
            return Int32(status)
        case .allHalted:
            printError("swiftvisor: \(label)\(reason.summary)")
            return 0
        case .timeout:
            printError("swiftvisor: \(label)guest \(reason.summary) after \(timeout ?? 0) s")
            return ToolStatus.timeout
        case let .shutdown(vcpu, state):
            printError("swiftvisor: \(label)vCPU \(vcpu) shut down (triple fault)")
            if let state { printError(state.dump) }
            return ToolStatus.failure
        case .migrated:
            printError("swiftvisor: \(label)\(reason.summary)")
            return 0
        case .engineFailure, .stopped:
            printError("swiftvisor: error: \(label)\(reason.summary)")
            return ToolStatus.failure
        }
    }
}

/// `--disk PATH[,ro][,vm=N]`.
struct DiskArgument {
    var path: String
    var readOnly: Bool
    /// The VM (by position) that gets the disk.
    var vm = 0

    init(_ text: String) throws {
        var parts = text.split(separator: ",", omittingEmptySubsequences: false).map(String.init)
        guard let first = parts.first, !first.isEmpty else { throw ValidationError("--disk needs a path") }
        path = first
        parts.removeFirst()
        readOnly = false
        for option in parts {
            if option == "ro" {
                readOnly = true
            } else if option.hasPrefix("vm="), let n = Int(option.dropFirst(3)), n >= 0 {
                vm = n
            } else {
                throw ValidationError("unknown --disk option '\(option)' (use 'ro' or 'vm=N')")
            }
        }
    }
}

/// One VM's console when several run: whole lines, each prefixed with the VM's name.
// SAFETY: the partial line is touched only under `lock`.
final class PrefixedOutput: @unchecked Sendable {
    private let prefix: [UInt8]
    private var line: [UInt8] = []
    private let lock = HostLock()
    init(prefix: String) { self.prefix = Array(prefix.utf8) }

    @Sendable func write(_ byte: UInt8) {
        lock.withLock {
            line.append(byte)
            guard byte == UInt8(ascii: "\n") else { return }
            let out = prefix + line
            line.removeAll(keepingCapacity: true)
            OutputLock.shared.withLock { out.withUnsafeBytes { writeAll(1, $0) } }
        }
    }
}

/// Serialises whole-line writes of several VMs to standard output.
enum OutputLock { static let shared = HostLock() }

func writeAll(_ fd: Int32, _ bytes: UnsafeRawBufferPointer) {
    var off = 0
    while off < bytes.count {
        let n = Glibc.write(fd, bytes.baseAddress! + off, bytes.count - off)
        if n < 0 { if errno == EINTR { continue }; return }
        off += n
    }
}

/// COM1 → standard output, byte by byte as the guest writes (interactive, unbuffered).
package enum ConsoleOutput {
    @Sendable package static func write(_ byte: UInt8) {
        var b = byte
        while Glibc.write(1, &b, 1) < 0 && errno == EINTR {}
        ProcessLifecycle.noteConsoleByte(byte)
    }
}

/// Standard input → the guest's consoles, on a background thread that ends at end of input.
enum ConsoleInput {
    static func start(feeding deliver: @escaping @Sendable ([UInt8]) -> Void) {
        HostThread(name: "stdin") { readLoop(deliver) }.detach()
    }

    private static func readLoop(_ deliver: @Sendable ([UInt8]) -> Void) {
        var buffer = [UInt8](repeating: 0, count: 256)
        while true {
            let n = buffer.withUnsafeMutableBytes { read(0, $0.baseAddress, $0.count) }
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { return }
            deliver(Array(buffer[0..<n]))
        }
    }
}

/// Writes `value` as JSON (snake_case keys, sorted, indented) to `path`.
package func writeJSON(_ path: String, _ value: some Encodable) throws {
    let encoder = JSONEncoder()
    encoder.keyEncodingStrategy = .convertToSnakeCase
    encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
    try writeFile(path, String(decoding: try encoder.encode(value), as: UTF8.self) + "\n")
}

package func writeFile(_ path: String, _ text: String) throws {
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
