import Devices
import Foundation
import OperatorAPI
import Synchronization
import TestSupport
import Testing
import VirtCore
import VMM
#if canImport(Glibc)
import Glibc
#endif

/// A fresh socket path in the temporary directory.
func socketPath(_ name: String) -> String {
    NSTemporaryDirectory() + "sv-api-\(getpid())-\(name)-\(UInt32.random(in: 0...UInt32.max)).sock"
}

/// A running software-engine counter guest with the API on a Unix socket.
final class APIServedGuest: @unchecked Sendable {  // SAFETY: fields are set in init and only read afterwards
    let machine: Machine
    let capture = SerialCapture()
    let server: APIServer
    let controller: VMController
    let client: APIClient
    let path: String
    private let runner: HostThread

    init(_ guest: String = "counter", engine: EngineChoice = .software, commandLine: String = "limit=100000000 work=20000",
         balloon: Bool = false, readTimeoutSeconds: Double = 10) throws {
        machine = try bundledMachine(guest, engine: engine, memory: 64 << 20, commandLine: commandLine, capture: capture)
        if balloon { try machine.addVirtioBalloon() }
        path = socketPath(guest)
        controller = VMController(running: machine)
        server = try APIServer(endpoint: .unix(path: path), router: APIRouter(controller: controller),
                               readTimeoutSeconds: readTimeoutSeconds)
        client = APIClient(socketPath: path)
        let m = machine
        runner = HostThread(name: "api-vm") { _ = try? m.run() }
    }

    func stop() {
        machine.stop()
        runner.join()
        server.close()
    }
}

/// Connects a raw client socket to `path`.
func rawConnect(_ path: String) throws -> Int32 {
    let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
    let rc = withUnixSocketAddress(path) { connect(fd, $0, $1) }
    guard rc == 0 else { let e = errno; close(fd); throw POSIXError(POSIXErrorCode(rawValue: e)!) }
    return fd
}

@Suite(.serialized) struct APIServerTests {
    /// One idle connection used to hold the old control socket for everyone; its backlog of 4
    /// refused most of 100 concurrent clients.
    @Test func anIdleConnectionBlocksNobodyAndAHundredConcurrentClientsAreAnswered() throws {
        let vm = try APIServedGuest(readTimeoutSeconds: 0.5)
        defer { vm.stop() }
        let idle = try rawConnect(vm.path)
        defer { close(idle) }
        let statuses = Mutex([Int]())
        let failures = Mutex([String]())
        DispatchQueue.concurrentPerform(iterations: 100) { _ in
            do {
                let r = try vm.client.send("GET", "/")
                statuses.withLock { $0.append(r.status) }
            } catch {
                failures.withLock { $0.append("\(error)") }
            }
        }
        #expect(failures.withLock { $0 } == [])
        #expect(statuses.withLock { $0.count } == 100)
        #expect(statuses.withLock { $0.allSatisfy { $0 == 200 } })
        // The idle connection is closed by the server after the read timeout.
        var byte: UInt8 = 0
        var tv = timeval(tv_sec: 20, tv_usec: 0)
        setsockopt(idle, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        #expect(recv(idle, &byte, 1, 0) == 0, "the server closed the idle connection")
    }

    /// A snapshot path with a space used to be split at it (overwriting `dir/my`), and a note
    /// lost its repeated spaces.
    @Test func aSnapshotPathWithASpaceAndANoteKeepTheirSpaces() throws {
        let vm = try APIServedGuest()
        defer { vm.stop() }
        #expect(waitUntil { vm.capture.text.contains("count 3\n") })
        let dir = NSTemporaryDirectory() + "sv-api-snap-\(getpid())"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try Data("keep me".utf8).write(to: URL(fileURLWithPath: dir + "/my"))
        let r = try vm.client.send("PUT", "/snapshot/create", json: SnapshotCreateRequest(snapshotPath: dir + "/my vm.snap", note: "two  spaces "))
        #expect(r.status == 200, "\(r.text)")
        let report = try r.decode(SnapshotReport.self)
        #expect(report.path == dir + "/my vm.snap")
        #expect(try String(contentsOfFile: dir + "/my", encoding: .utf8) == "keep me")
        let snapshot = try SnapshotFile(path: dir + "/my vm.snap")
        #expect(snapshot.metadata.note == "two  spaces ")
    }

    /// Counters scraped twice while the guest runs: the text parses as the Prometheus format
    /// (every sample has a TYPE, every value a number) and the exit counters grow.
    @Test func metricsScrapedWhileTheGuestRunsParseAndGrow() throws {
        let vm = try APIServedGuest()
        defer { vm.stop() }
        #expect(waitUntil { vm.capture.text.contains("count 3\n") })
        let first = try PrometheusText(vm.client.send("GET", "/metrics").text)
        // Live counters are published every ~10 ms of a vCPU's run: scrape until they moved.
        let io = #"swiftvisor_vm_exits_total{reason="io"}"#
        #expect(waitUntil {
            guard let text = try? vm.client.send("GET", "/metrics").text, let later = try? PrometheusText(text) else { return false }
            return (later.samples[io] ?? 0) > (first.samples[io] ?? 0)
        })
        let secondResponse = try vm.client.send("GET", "/metrics")
        #expect(secondResponse.headers.contains { $0.name == "content-type" && $0.value.hasPrefix("text/plain") })
        let second = try PrometheusText(secondResponse.text)
        #expect(try #require(second.samples[io]) > (first.samples[io] ?? 0))
        #expect(try #require(second.samples["swiftvisor_vcpu_guest_seconds_total"]) > first.samples["swiftvisor_vcpu_guest_seconds_total"] ?? 0)
        #expect(second.samples["swiftvisor_vcpu_vmm_seconds_total"] != nil)
        #expect(try #require(second.samples["swiftvisor_instructions_total"]) > first.samples["swiftvisor_instructions_total"] ?? 0)
        #expect(second.samples["swiftvisor_translator_blocks_total"] != nil)
        #expect(second.samples.keys.contains { $0.hasPrefix("swiftvisor_vm_port_exits_total{") && $0.contains(#"device="com1""#) })
        #expect(second.types["swiftvisor_vm_exits_total"] == "counter")
        #expect(second.types["swiftvisor_translated_share"] == "gauge")
        #expect(second.samples["swiftvisor_vm_up"] == 1)
    }

    @Test(arguments: TestEngines.available)
    func balloonThroughTheAPIGivesMemoryBack(engine: EngineChoice) throws {
        let vm = try APIServedGuest("balloon", engine: engine, commandLine: "", balloon: true)
        defer { vm.stop() }
        // The guest touches its whole page pool (most of RAM) before taking commands.
        #expect(waitUntil { vm.machine.memory.allocatedBytes >= 60 << 20 })
        let before = vm.machine.memory.allocatedBytes
        let r = try vm.client.send("PATCH", "/balloon", json: BalloonRequest(amountMib: 16))
        #expect(r.status == 200, "\(r.text)")
        #expect(try r.decode(BalloonInfo.self).targetPages == 4096)
        let balloon = try #require(vm.machine.balloon)
        #expect(waitUntil { balloon.actualPages == 4096 })
        #expect(vm.machine.memory.allocatedBytes <= vm.machine.memory.size - (16 << 20))
        #expect(vm.machine.memory.allocatedBytes < before)
        let info = try vm.client.send("GET", "/balloon").decode(BalloonInfo.self)
        #expect(info.actualPages == 4096 && info.amountMib == 16)
        let stats = try vm.client.send("GET", "/balloon/statistics").decode(BalloonStatisticsInfo.self)
        #expect(stats.inflatedPages >= 4096)
        let metrics = try PrometheusText(vm.client.send("GET", "/metrics").text)
        #expect(metrics.samples["swiftvisor_balloon_actual_pages"] == 4096)
        #expect(metrics.samples.keys.contains { $0.hasPrefix("swiftvisor_virtio_queue_notifications_total{") })
        let bad = try vm.client.send("PATCH", "/balloon", json: ["amount_mib": "lots"])
        #expect(bad.status == 400 && bad.faultMessage.contains("amount_mib"))
        let both = try vm.client.send("PATCH", "/balloon", json: BalloonRequest(amountMib: 1, targetPages: 1))
        #expect(both.status == 400 && both.faultMessage.contains("exactly one"))
        _ = try vm.client.send("PATCH", "/balloon", json: BalloonRequest(targetPages: VirtioBalloon.quitTarget))
    }

    @Test func statesAndErrorsHaveTheirStatusCodes() throws {
        let vm = try APIServedGuest()
        defer { vm.stop() }
        let info = try vm.client.send("GET", "/").decode(InstanceInfo.self)
        #expect(info.state == "Running" && info.engine == "software" && info.vcpus == 1 && info.memoryBytes == 64 << 20)
        #expect(try vm.client.send("PATCH", "/vm", json: VMStateRequest(state: "Paused")).status == 204)
        #expect(vm.machine.isPaused)
        #expect(try vm.client.send("GET", "/").decode(InstanceInfo.self).state == "Paused")
        #expect(try vm.client.send("PATCH", "/vm", json: VMStateRequest(state: "Resumed")).status == 204)
        #expect(!vm.machine.isPaused)
        let sleepy = try vm.client.send("PATCH", "/vm", json: VMStateRequest(state: "Sleepy"))
        #expect(sleepy.status == 400 && sleepy.faultMessage.contains("Paused"))
        let preboot = try vm.client.send("PUT", "/machine-config", json: MachineConfigRequest(vcpuCount: 2))
        #expect(preboot.status == 400 && preboot.faultMessage.contains("before InstanceStart"))
        let start = try vm.client.send("PUT", "/actions", json: ActionRequest(actionType: "InstanceStart"))
        #expect(start.status == 400 && start.faultMessage.contains("already started"))
        #expect(try vm.client.send("GET", "/nowhere").status == 404)
        #expect(try vm.client.send("DELETE", "/vm").status == 405)
        let notJSON = try vm.client.send("PATCH", "/vm", json: Optional<String>.none)
        #expect(notJSON.status == 400 && notJSON.faultMessage.contains("JSON body"))
        #expect(notJSON.headers.contains { $0.name == "content-type" && $0.value == "application/json" })
    }

    @Test func beforeInstanceStartTheVMIsNotRunning() throws {
        let controller = VMController(serialOutput: { _ in })
        let path = socketPath("preboot")
        let server = try APIServer(endpoint: .unix(path: path), router: APIRouter(controller: controller))
        defer { server.close() }
        let client = APIClient(socketPath: path)
        let pause = try client.send("PATCH", "/vm", json: VMStateRequest(state: "Paused"))
        #expect(pause.status == 409 && pause.faultMessage.contains("not started"))
        #expect(try client.send("PUT", "/snapshot/create", json: SnapshotCreateRequest(snapshotPath: "/tmp/x.snap")).status == 409)
        let noBoot = try client.send("PUT", "/actions", json: ActionRequest(actionType: "InstanceStart"))
        #expect(noBoot.status == 400 && noBoot.faultMessage.contains("boot-source"))
        let badGuest = try client.send("PUT", "/boot-source", json: BootSourceRequest(guest: "no-such-guest"))
        #expect(badGuest.status == 400 && badGuest.faultMessage.contains("no bundled guest"))
        let badMemory = try client.send("PUT", "/machine-config", json: MachineConfigRequest(memSizeMib: 3))
        #expect(badMemory.status == 400)
        let badNet = try client.send("PUT", "/network-interfaces/eth0", json: NetworkInterfaceRequest(attachment: "wifi"))
        #expect(badNet.status == 400)
        #expect(try client.send("GET", "/").decode(InstanceInfo.self).state == "Not started")
    }
}

@Suite struct APISocketPathTests {
    /// `--control PATH` used to unlink whatever was there: a user's file, or another running
    /// VM's live socket (which the second VM then silently took over).
    @Test func aLiveSocketOrAFileIsNeverReplacedAndAStaleSocketIs() throws {
        let controller = VMController(serialOutput: { _ in })
        let router = APIRouter(controller: controller)
        let path = socketPath("live")
        let first = try APIServer(endpoint: .unix(path: path), router: router)
        #expect(throws: APISocketError.inUse(path)) {
            try APIServer(endpoint: .unix(path: path), router: router)
        }
        #expect(try APIClient(socketPath: path).send("GET", "/").status == 200, "the first server still answers")
        first.close()
        #expect(access(path, F_OK) != 0, "close() removed the socket file")

        let file = socketPath("file")
        try Data("a user's file".utf8).write(to: URL(fileURLWithPath: file))
        defer { unlink(file) }
        #expect(throws: APISocketError.notASocket(file)) {
            try APIServer(endpoint: .unix(path: file), router: router)
        }
        #expect(try String(contentsOfFile: file, encoding: .utf8) == "a user's file")

        // A stale socket: bound and listened on by a socket that is gone.
        let stale = socketPath("stale")
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        let rc = withUnixSocketAddress(stale) { bind(fd, $0, $1) }
        #expect(rc == 0)
        close(fd)
        let replacing = try APIServer(endpoint: .unix(path: stale), router: router)
        defer { replacing.close() }
        #expect(try APIClient(socketPath: stale).send("GET", "/").status == 200)
    }
}

/// The Prometheus text format, parsed strictly enough to catch malformed output.
struct PrometheusText {
    /// "name{labels}" → value.
    var samples: [String: Double] = [:]
    var types: [String: String] = [:]

    struct Malformed: Error { var line: String }

    init(_ text: String) throws {
        for line in text.split(separator: "\n").map(String.init) {
            if line.hasPrefix("# TYPE ") {
                let parts = line.split(separator: " ")
                guard parts.count == 4, ["counter", "gauge", "histogram", "summary", "untyped"].contains(parts[3]) else { throw Malformed(line: line) }
                types[String(parts[2])] = String(parts[3])
                continue
            }
            if line.hasPrefix("# HELP ") { continue }
            guard let space = line.lastIndex(of: " "), let value = Double(line[line.index(after: space)...]) else { throw Malformed(line: line) }
            let key = String(line[..<space])
            let name = String(key.prefix { $0 != "{" })
            guard name.allSatisfy({ $0.isLetter || $0.isNumber || $0 == "_" || $0 == ":" }), types[name] != nil else { throw Malformed(line: line) }
            if key.contains("{") { guard key.hasSuffix("}") else { throw Malformed(line: line) } }
            samples[key] = value
        }
    }
}

@Suite struct APITCPTests {
    /// Sends a raw HTTP request to 127.0.0.1:`port`; returns the status line.
    static func statusLine(port: Int, request: String) throws -> String {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        defer { close(fd) }
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_port = in_port_t(UInt16(port).bigEndian)
        addr.sin_addr.s_addr = inet_addr("127.0.0.1")
        let rc = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        #expect(rc == 0)
        _ = Array(request.utf8).withUnsafeBytes { send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
        var answer: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 4096)
        while true {
            let n = buffer.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
            if n <= 0 { break }
            answer += buffer[0..<n]
        }
        // "\r\n" is one Character in Swift.
        return String(String(decoding: answer, as: UTF8.self).prefix { $0 != "\r\n" })
    }

    @Test func loopbackTCPNeedsTheToken() throws {
        let server = try APIServer(endpoint: .tcp(host: "127.0.0.1", port: 0, token: "s3cret"),
                                   router: APIRouter(controller: VMController(serialOutput: { _ in })))
        defer { server.close() }
        let port = try #require(server.boundPort)
        #expect(try Self.statusLine(port: port, request: "GET / HTTP/1.1\r\nHost: x\r\n\r\n") == "HTTP/1.1 401 Unauthorized")
        #expect(try Self.statusLine(port: port, request: "GET / HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer wrong\r\n\r\n") == "HTTP/1.1 401 Unauthorized")
        #expect(try Self.statusLine(port: port, request: "GET / HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer s3cret\r\n\r\n") == "HTTP/1.1 200 OK")
        #expect(throws: APIError.self) {
            try APIServer(endpoint: .tcp(host: "0.0.0.0", port: 0, token: "t"), router: APIRouter(controller: VMController(serialOutput: { _ in })))
        }
    }
}
