import Foundation
import Synchronization
import TestSupport
import Testing
import VMM
import VirtCore

/// A Linux VM of this test process on the PC platform (software engine): COM1 collected,
/// lines typed into the UART's receive queue, a virtio-pci NIC on `network`. Several of
/// them on one `switch:NAME` share the process's learning switch, as the VMs of one
/// `swiftvisor run` do.
final class LinuxMachine: LinuxConsole, Sendable {
    let machine: Machine
    private let console: SerialCapture
    private let outcome: Outcome
    private let thread: HostThread

    private final class Outcome: Sendable { let result = Mutex<Result<StopReason, RunFailure>?>(nil) }

    convenience init(_ files: LinuxGuest.Files, name: String, network: NetworkAttachment, vcpus: Int = 1) throws {
        try self.init(files, name: name, vcpus: vcpus) { try $0.addVirtioPCINet(attachment: network) }
    }

    /// Booted with `commandLine`; `devices` attaches the machine's virtio-pci devices.
    convenience init(_ files: LinuxGuest.Files, name: String, commandLine: String = "console=ttyS0", vcpus: Int = 1,
                     devices: (Machine) throws -> Void) throws {
        let config = MachineConfiguration(memorySize: 256 << 20, vcpuCount: vcpus, commandLine: commandLine,
                                          timeoutSeconds: 600, guestName: name)
        let kernel = [UInt8](try Data(contentsOf: URL(fileURLWithPath: files.kernel)))
        let initrd = [UInt8](try Data(contentsOf: URL(fileURLWithPath: files.initrd)))
        try self.init(name: name) { output in
            let machine = try PCPlatform.machine(kernel: kernel, modules: [(bytes: initrd, commandLine: files.initrd)], configuration: config,
                                                 engine: try TestEngines.make(.software), serialOutput: output)
            try devices(machine)
            return machine
        }
    }

    /// Runs the machine `make` builds (a restored snapshot, say) with COM1 going to `output`.
    init(name: String, make: (_ output: @escaping @Sendable (UInt8) -> Void) throws -> Machine) throws {
        let console = SerialCapture(), outcome = Outcome()
        self.console = console
        self.outcome = outcome
        let machine = try make { console.append($0) }
        self.machine = machine
        thread = HostThread(name: name) {
            let ended: Result<StopReason, RunFailure>
            do { ended = .success(try machine.run().stopReason) } catch { ended = .failure(RunFailure(description: "\(error)")) }
            outcome.result.withLock { $0 = ended }
        }
    }

    var text: String { console.text }
    var isRunning: Bool { outcome.result.withLock { $0 == nil } }
    /// How `run` ended, once it has.
    var ended: Result<StopReason, RunFailure>? { outcome.result.withLock { $0 } }
    struct RunFailure: Error, CustomStringConvertible { var description: String }
    func type(_ line: String) { machine.uart.enqueueInput(Array((line + "\n").utf8)) }

    /// Stops the VM if it still runs and waits (bounded) for its thread.
    func stop() {
        machine.stop()
        if waitUntil(seconds: 60, { !isRunning }) { thread.join() }
    }
}

/// A console of `swiftvisor run --console-dir DIR`: the Unix socket DIR/vmN.sock, connected
/// (bounded retries while the process starts), its output collected on a thread.
final class LinuxConsoleSocket: LinuxConsole, Sendable {
    private let fd: Int32
    private let console: SerialCapture
    private let run: LinuxRun

    init(path: String, of run: LinuxRun) throws {
        self.run = run
        var connected: Int32 = -1
        _ = waitUntil(seconds: 60) {
            let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
            guard fd >= 0 else { return false }
            if withUnixSocketAddress(path, { connect(fd, $0, $1) }) == 0 { connected = fd; return true }
            close(fd)
            return !run.isRunning
        }
        guard connected >= 0 else { throw LinuxGuest.PreparationFailure(reason: "cannot connect to \(path):\n\(run.tail)") }
        fd = connected
        let console = SerialCapture(), connection = connected
        self.console = console
        HostThread(name: "console-client") {
            var buffer = [UInt8](repeating: 0, count: 4096)
            while true {
                let n = buffer.withUnsafeMutableBytes { read(connection, $0.baseAddress, $0.count) }
                if n < 0 && errno == EINTR { continue }
                if n <= 0 { break }
                buffer[0..<n].forEach(console.append)
            }
            close(connection)
        }.detach()
    }

    /// The reader thread sees end of file and closes the descriptor.
    deinit { shutdown(fd, Int32(SHUT_RDWR)) }

    var text: String { console.text }
    var isRunning: Bool { run.isRunning }
    func type(_ line: String) {
        let bytes = Array((line + "\n").utf8)
        _ = bytes.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
    }
}

@Suite(.serialized, .enabled(if: LinuxVirtioGuest.available, LinuxVirtioGuest.skipReason))
struct LinuxNetworkTests {
    /// Two Linux VMs of this test process, each with Linux's virtio_net over virtio-pci on
    /// one switch, ping each other (`pingBetween`); both power off through ACPI S5.
    @Test func twoLinuxVMsPingOverTheSwitch() throws {
        let files = try LinuxVirtioGuest.prepared.get()
        let network = NetworkAttachment.networkSwitch("linux-ping-\(getpid())")
        let started = Date()
        let vms = try (1...2).map { try LinuxMachine(files, name: "linux\($0)", network: network) }
        defer { vms.forEach { $0.stop() } }
        try Self.pingBetween(vms, started: started, label: "two Machines of the test process")
        for (n, vm) in zip(1..., vms) {
            _ = waitUntil(seconds: 120) { !vm.isRunning }
            // ACPI S5 (busybox's poweroff) stops the machine with status 0.
            let ended = try? vm.ended?.get()
            #expect(ended == .exitPort(status: 0), "VM \(n) ended with \(vm.ended.map { "\($0)" } ?? "nothing (still running)"):\n\(vm.tail)")
        }
    }

    /// The same from the command line: `swiftvisor run --kernel … --vms 2 --net switch:NAME
    /// --console-dir DIR`, each VM's shell driven through its DIR/vmN.sock; the run exits
    /// with status 0 once both have powered off.
    @Test func twoLinuxVMsOfOneRunPingOverTheSwitch() throws {
        let files = try LinuxVirtioGuest.prepared.get()
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("swiftvisor-consoles-\(getpid())")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: directory) }
        let started = Date()
        let run = try LinuxRun(files, extraArguments: ["--vms", "2", "--net", "switch:lan", "--console-dir", directory.path])
        defer { run.kill() }
        let vms = try (0..<2).map { try LinuxConsoleSocket(path: directory.appendingPathComponent("vm\($0).sock").path, of: run) }
        try Self.pingBetween(vms, started: started, label: "one swiftvisor run, --vms 2")
        _ = waitUntil(seconds: 120) { !run.process.isRunning }
        try #require(!run.process.isRunning, "swiftvisor still runs after both VMs powered off:\n\(run.tail)")
        #expect(run.process.terminationStatus == 0, "exit status \(run.process.terminationStatus):\n\(run.tail)")
        // Standard output has every VM's lines, each under its prefix.
        #expect(run.text.contains("[vm0] ") && run.text.contains("[vm1] "), "\(run.tail)")
        #expect(!FileManager.default.fileExists(atPath: directory.appendingPathComponent("vm0.sock").path), "the console socket outlived the run")
    }

    /// Waits for both shells, configures eth0 on each (10.0.0.1 and 10.0.0.2 with busybox's
    /// `ip`), pings VM 2 three times from VM 1 (ARP, then ICMP echo both ways through the
    /// switch) and VM 1 once from VM 2, then powers both off.
    static func pingBetween(_ vms: [any LinuxConsole], started: Date, label: String) throws {
        var at: [String.Index?] = []
        for (n, vm) in zip(1..., vms) {
            let eth0 = vm.waitFor("swiftvisor-init: network interface eth0", seconds: 400)
            try #require(eth0 != nil, "VM \(n) has no eth0:\n\(vm.tail)")
            let prompt = vm.prompt(after: eth0)
            try #require(prompt != nil, "VM \(n): no shell prompt:\n\(vm.tail)")
            at.append(prompt)
        }
        print("LinuxNetworkTests (\(label)): both shells up after \(String(format: "%.1f", Date().timeIntervalSince(started))) s, booting side by side (software engine, 1 vCPU each)")
        for (n, vm) in zip(1..., vms) {
            // Two short commands: a line wider than the terminal comes back wrapped.
            let addressed = vm.answer("ip addr add 10.0.0.\(n)/24 dev eth0", expecting: "/ # ", after: at[n - 1])
            try #require(addressed != nil, "VM \(n): ip addr add failed:\n\(vm.tail)")
            let configured = vm.answer("ip link set eth0 up && echo eth0-up-$((40+\(n)))", expecting: "eth0-up-4\(n)", after: addressed)
            try #require(configured != nil, "VM \(n): configuring eth0 failed:\n\(vm.tail)")
            at[n - 1] = vm.prompt(after: configured)
            try #require(at[n - 1] != nil, "VM \(n): no prompt after configuring eth0:\n\(vm.tail)")
        }

        // -W bounds the wait for each reply: a lost frame ends the command with fewer received.
        let pingStarted = Date()
        let pinged = vms[0].answer("ping -c 3 -W 10 10.0.0.2", expecting: "packets received", after: at[0], seconds: 180)
        try #require(pinged != nil, "ping did not finish:\n\(vms[0].tail)")
        let loss = vms[0].waitFor("% packet loss", after: pinged, seconds: 30)
        let summary = vms[0].text[..<(loss ?? pinged!)].split(separator: "\n").last.map(String.init) ?? ""
        #expect(summary.contains("3 packets transmitted, 3 packets received, 0% packet loss"), "\(vms[0].tail)")
        let wallSeconds = Date().timeIntervalSince(pingStarted)
        if let rtt = vms[0].waitFor("round-trip min/avg/max = ", after: pinged, seconds: 30), vms[0].waitFor(" ms", after: rtt, seconds: 30) != nil {
            // The guest's times are on its TSC (retired instructions at the 1 GHz the PIT
            // calibration finds), not the host's clock; the wall time covers 3 echoes 1 s apart.
            print("LinuxNetworkTests (\(label)): ping 10.0.0.1 → 10.0.0.2: round-trip min/avg/max \(vms[0].text[rtt...].prefix { !$0.isNewline }) (guest clock); ping -c 3 took \(String(format: "%.2f", wallSeconds)) s of wall time")
        }
        at[0] = vms[0].prompt(after: pinged)
        try #require(at[0] != nil, "VM 1: no prompt after ping:\n\(vms[0].tail)")

        let back = vms[1].answer("ping -c 1 -W 10 10.0.0.1", expecting: "1 packets received", after: at[1], seconds: 120)
        #expect(back != nil, "VM 2 could not ping VM 1:\n\(vms[1].tail)")
        at[1] = vms[1].prompt(after: back ?? at[1])

        for (n, vm) in zip(1..., vms) {
            vm.type("poweroff")
            #expect(vm.waitFor("reboot: Power down", after: at[n - 1], seconds: 120) != nil, "VM \(n):\n\(vm.tail)")
            #expect(!vm.text.contains("Kernel panic"), "VM \(n):\n\(vm.tail)")
        }
    }
}
