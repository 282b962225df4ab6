import Foundation
import OperatorAPI
import Synchronization
import TestSupport
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// A `swiftvisor` serving its API in the background, its standard output and error gathered (CLILifecycleTests has the general one).
final class APIProcess: @unchecked Sendable {  // SAFETY: `process` is set in init; the output buffers are Mutexes
    let process = Process()
    private let out = Mutex(Data())
    private let err = Mutex(Data())
    /// Left by each reader at the end of its pipe: the output is whole once both have.
    private let readers = DispatchGroup()

    init(_ args: [String]) throws {
        process.executableURL = URL(fileURLWithPath: swiftvisorPath)
        process.arguments = args
        let outPipe = Pipe(), errPipe = Pipe()
        process.standardOutput = outPipe
        process.standardError = errPipe
        process.standardInput = FileHandle.nullDevice
        try process.run()
        readers.enter()
        Thread { [self] in
            Self.drain(outPipe) { chunk in out.withLock { $0 += chunk } }
            readers.leave()
        }.start()
        readers.enter()
        Thread { [self] in
            Self.drain(errPipe) { chunk in err.withLock { $0 += chunk } }
            readers.leave()
        }.start()
    }

    private static func drain(_ pipe: Pipe, into append: (Data) -> Void) {
        while true {
            let chunk = pipe.fileHandleForReading.readSomeRetrying()
            if chunk.isEmpty { return }
            append(chunk)
        }
    }

    var stdout: String { String(decoding: out.withLock { $0 }, as: UTF8.self) }
    var stderr: String { String(decoding: err.withLock { $0 }, as: UTF8.self) }

    /// Waits (bounded) for the process to end; its status, or nil if it did not.
    func waitForExit(seconds: Double = 60) -> Int32? {
        guard waitUntil(seconds: seconds, { !process.isRunning }) else { return nil }
        process.waitUntilExit()
        _ = readers.wait(timeout: .now() + 10)  // the last output may still be in the pipes
        return process.terminationStatus
    }

    func kill() {
        if process.isRunning { process.terminate() }
        process.waitUntilExit()
    }
}

func apiSocketPath(_ name: String) -> String {
    NSTemporaryDirectory() + "sv-cli-api-\(getpid())-\(name).sock"
}

/// Waits until something listens at `path`.
func waitForSocket(_ path: String, process: APIProcess) -> Bool {
    waitUntil(seconds: 30) { (try? APIClient(socketPath: path).send("GET", "/").status) == 200 || !process.process.isRunning }
        && process.process.isRunning
}

@Suite(.serialized) struct CLIOperatorAPITests {
    /// The issue's done-when: an instance with no VM, configured and started over HTTP,
    /// paused, snapshotted (a path with a space, a note with two), resumed, scraped, stopped.
    @Test func serveConfigureStartPauseSnapshotResumeScrapeStop() throws {
        let socket = apiSocketPath("serve")
        let dir = NSTemporaryDirectory() + "sv-cli-api-\(getpid())"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let serve = try APIProcess(["serve", "--api-sock", socket])
        defer { serve.kill() }
        #expect(waitForSocket(socket, process: serve), "\(serve.stderr)")
        let api = APIClient(socketPath: socket)

        #expect(try api.send("GET", "/").decode(InstanceInfo.self).state == "Not started")
        #expect(try api.send("PUT", "/machine-config", json: MachineConfigRequest(vcpuCount: 1, memSizeMib: 32, engine: "software")).status == 204)
        #expect(try api.send("PUT", "/boot-source", json: BootSourceRequest(guest: "counter", bootArgs: "limit=100000000 work=20000")).status == 204)
        #expect(try api.send("PUT", "/actions", json: ActionRequest(actionType: "InstanceStart")).status == 204)
        let running = try api.send("GET", "/").decode(InstanceInfo.self)
        #expect(running.state == "Running" && running.engine == "software" && running.guest == "counter" && running.memoryBytes == 32 << 20)
        #expect(waitUntil { serve.stdout.contains("count 3\n") }, "the guest counts on standard output")
        #expect(try api.send("PUT", "/boot-source", json: BootSourceRequest(guest: "hello")).status == 400, "pre-boot resources are closed now")

        let pause = try swiftvisor(["ctl", "--api-sock", socket, "pause"])
        #expect(pause.status == 0 && pause.stdout == "paused\n", "\(pause.stderr)")
        #expect(try api.send("GET", "/").decode(InstanceInfo.self).state == "Paused")
        let status = try swiftvisor(["ctl", "--api-sock", socket, "status"])
        #expect(status.stdout.hasPrefix("Paused: counter, engine software, 1 vCPU, 32 MiB"))

        let file = dir + "/my vm.snap"
        let snap = try swiftvisor(["ctl", "--api-sock", socket, "snapshot", file, "--note", "e2e  test"])
        #expect(snap.status == 0, "\(snap.stderr)")
        #expect(snap.stdout.contains("copy-on-write faults"))
        #expect(!FileManager.default.fileExists(atPath: dir + "/my"))
        let inspect = try swiftvisor(["snapshot", "inspect", file])
        #expect(inspect.stdout.contains("note:         e2e  test"))

        let printed = serve.stdout.count
        #expect(try api.send("PATCH", "/vm", json: VMStateRequest(state: "Resumed")).status == 204)
        #expect(waitUntil { serve.stdout.count > printed + 20 }, "the guest counts on after the resume")

        let metrics = try api.send("GET", "/metrics")
        #expect(metrics.status == 200)
        #expect(metrics.text.contains("\nswiftvisor_snapshots_total 1\n"))
        #expect(metrics.text.contains(#"swiftvisor_vm_exits_total{reason="io"} "#))
        #expect(metrics.text.contains("# TYPE swiftvisor_snapshot_pause_seconds_total counter"))

        let stop = try swiftvisor(["ctl", "--api-sock", socket, "stop"])
        #expect(stop.status == 0 && stop.stdout == "stopped\n")
        #expect(serve.waitForExit() == 0, "\(serve.stderr)")
        #expect(access(socket, F_OK) != 0, "the socket file is removed at exit")
        #expect(serve.stderr.contains("swiftvisor: VM started"))
        #expect(serve.stderr.contains("swiftvisor: snapshot written"))
    }

    /// A client that connected and closed without a request (or before reading its answer)
    /// used to kill the VM with SIGPIPE (exit 141, no message).
    @Test func clientsThatHangUpDoNotKillTheVM() throws {
        let socket = apiSocketPath("sigpipe")
        let vm = try APIProcess(["run", "counter", "--engine", "software", "--cmdline", "limit=100000000 work=20000", "--api-sock", socket])
        defer { vm.kill() }
        #expect(waitForSocket(socket, process: vm), "\(vm.stderr)")
        for i in 0..<40 {
            let fd = connectUnixSocket(socket)
            #expect(fd >= 0)
            if i % 2 == 1 {
                // A request, then gone before the answer.
                let request = Array("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n".utf8)
                _ = request.withUnsafeBytes { send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
                var linger = linger(l_onoff: 1, l_linger: 0)  // close with a reset
                setsockopt(fd, SOL_SOCKET, SO_LINGER, &linger, socklen_t(MemoryLayout<linger>.size))
            }
            close(fd)
        }
        let status = try APIClient(socketPath: socket).send("GET", "/")
        #expect(status.status == 200)
        #expect(try status.decode(InstanceInfo.self).state == "Running")
        #expect(vm.process.isRunning)
        _ = try swiftvisor(["ctl", "--api-sock", socket, "stop"])
        #expect(vm.waitForExit() == 125, "a VM stopped from outside ends with 125, as before")
        #expect(!vm.stderr.contains("Fatal"))
    }

    /// `--control PATH` used to unlink whatever was there: another VM's live socket (taking
    /// it over) or a user's file.
    @Test func apiSockRefusesALiveSocketAndAFile() throws {
        let socket = apiSocketPath("live")
        let first = try APIProcess(["run", "counter", "--engine", "software", "--cmdline", "limit=100000000 work=20000", "--api-sock", socket])
        defer { first.kill() }
        #expect(waitForSocket(socket, process: first), "\(first.stderr)")
        let second = try swiftvisor(["run", "hello", "--engine", "software", "--api-sock", socket])
        #expect(second.status == 125)
        #expect(second.stderr == "swiftvisor: error: \(socket) is in use by a running VM (its API socket answers); choose another path\n")
        #expect(try APIClient(socketPath: socket).send("GET", "/").status == 200, "the first VM keeps its socket")
        _ = try swiftvisor(["ctl", "--api-sock", socket, "stop"])
        _ = first.waitForExit()

        let file = NSTemporaryDirectory() + "sv-cli-api-\(getpid())-user-file"
        try Data("precious".utf8).write(to: URL(fileURLWithPath: file))
        defer { unlink(file) }
        let onFile = try swiftvisor(["run", "hello", "--engine", "software", "--control", file])
        #expect(onFile.status == 125)
        #expect(onFile.stderr.contains("exists and is not a socket; refusing to replace it"))
        #expect(try String(contentsOfFile: file, encoding: .utf8) == "precious")
    }

    /// `--metrics-file` for a run without a socket: written when the guest stops.
    @Test func metricsFileIsWrittenAtExit() throws {
        let file = NSTemporaryDirectory() + "sv-cli-api-\(getpid()).prom"
        defer { unlink(file) }
        let r = try swiftvisor(["run", "hello", "--engine", "software", "--metrics-file", file])
        #expect(r.status == 0, "\(r.stderr)")
        let text = try String(contentsOfFile: file, encoding: .utf8)
        #expect(text.contains("# TYPE swiftvisor_vm_exits_total counter"))
        #expect(text.contains(#"swiftvisor_vm_port_exits_total{port="0x3f8",device="com1"}"#))
        #expect(text.contains("swiftvisor_instructions_total "))
    }

    /// `--log-level` decides which events reach standard error.
    @Test func logLevelFiltersEvents() throws {
        for (level, expectWaiting) in [("info", true), ("warning", false)] {
            let socket = apiSocketPath("log-\(level)")
            let serve = try APIProcess(["serve", "--api-sock", socket, "--log-level", level])
            defer { serve.kill() }
            #expect(waitForSocket(socket, process: serve))
            _ = try swiftvisor(["ctl", "--api-sock", socket, "stop"])
            #expect(serve.waitForExit() == 0)
            #expect(serve.stderr.contains("swiftvisor: waiting for the VM's configuration on the API") == expectWaiting, "\(level): \(serve.stderr)")
        }
        let bad = try swiftvisor(["serve", "--api-sock", apiSocketPath("bad-level"), "--log-level", "loud"])
        #expect(bad.status == 64)
    }
}

/// A connected Unix stream socket to `path`, or -1.
func connectUnixSocket(_ path: String) -> Int32 {
    let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
    let rc = withUnixSocketAddress(path) { connect(fd, $0, $1) }
    if rc != 0 { close(fd); return -1 }
    return fd
}
