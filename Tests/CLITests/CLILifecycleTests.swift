import Foundation
import Synchronization
import TestSupport
import Testing

/// `swiftvisor …` running in the background, its output collected as it comes.
final class BackgroundSwiftvisor: Sendable {
    let process: Process
    private final class Collected: Sendable { let data = Mutex(Data()) }
    private let stdoutText = Collected()
    private let stderrText = Collected()
    private let readersDone = DispatchGroup()

    init(_ args: [String], environment: [String: String] = [:]) throws {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: swiftvisorPath)
        p.arguments = args
        if !environment.isEmpty { p.environment = ProcessInfo.processInfo.environment.merging(environment) { $1 } }
        let out = Pipe(), err = Pipe()
        p.standardOutput = out
        p.standardError = err
        p.standardInput = FileHandle.nullDevice
        process = p
        try p.run()
        for (pipe, sink) in [(out, stdoutText), (err, stderrText)] {
            readersDone.enter()
            Thread { [readersDone] in
                while true {
                    let chunk = pipe.fileHandleForReading.readSomeRetrying()
                    if chunk.isEmpty { break }
                    sink.data.withLock { $0 += chunk }
                }
                readersDone.leave()
            }.start()
        }
    }

    var stdout: String { String(decoding: stdoutText.data.withLock { $0 }, as: UTF8.self) }
    var stderr: String { String(decoding: stderrText.data.withLock { $0 }, as: UTF8.self) }

    /// Waits (bounded) for the process to end and its output to be read; false if it did
    /// not end in time (it is then killed, so a failing test cannot leave it running).
    func waitForExit(seconds: Double = 60) -> Bool {
        let ended = waitUntil(seconds: seconds) { !process.isRunning }
        if !ended { kill(process.processIdentifier, SIGKILL) }
        process.waitUntilExit()
        _ = readersDone.wait(timeout: .now() + 10)
        return ended
    }

    /// The exit status when the process exited (nil when a signal killed it).
    var exitStatus: Int32? { process.terminationReason == .exit ? process.terminationStatus : nil }
}

@Suite struct CLISignalTests {
    static let stopSignals: [(Int32, String)] = [(SIGINT, "SIGINT"), (SIGTERM, "SIGTERM"), (SIGHUP, "SIGHUP")]

    /// A counting VM with a control socket, stopped by a real signal once it runs: the
    /// process says so on its own line, exits 128 + signal and leaves no socket behind.
    @Test(arguments: [0, 1, 2])
    func stopSignalEndsARunInOrder(which: Int) throws {
        let (signal, name) = Self.stopSignals[which]
        let socket = NSTemporaryDirectory() + "swiftvisor-cli-signal-\(getpid())-\(name).sock"
        defer { unlink(socket) }
        let vm = try BackgroundSwiftvisor(["run", "counter", "--engine", "software", "--cmdline", "work=200000", "--control", socket])
        let running = waitUntil { vm.stdout.contains("count 3\n") && FileManager.default.fileExists(atPath: socket) }
        #expect(running, "the VM started: \(vm.stderr)")
        #expect(kill(vm.process.processIdentifier, signal) == 0)
        #expect(vm.waitForExit(), "\(name) ended the run")
        #expect(vm.exitStatus == 128 + signal, "exit status for \(name); stderr: \(vm.stderr)")
        #expect(vm.stderr.hasSuffix("swiftvisor: stopped by \(name)\n"))
        #expect(!vm.stderr.contains("error"))
        #expect(!FileManager.default.fileExists(atPath: socket), "the control socket is removed")
    }

    /// A lab writing snapshot files, interrupted: nothing of it is left in the directory.
    @Test func interruptedLabLeavesNoFiles() throws {
        let dir = NSTemporaryDirectory() + "swiftvisor-cli-lab-\(getpid())"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let lab = try BackgroundSwiftvisor(["lab", "cow-snapshot", "--engine", "software"], environment: ["TMPDIR": dir])
        let writing = waitUntil { !((try? FileManager.default.contentsOfDirectory(atPath: dir)) ?? []).isEmpty }
        #expect(writing, "the lab wrote a snapshot file: \(lab.stderr)")
        #expect(kill(lab.process.processIdentifier, SIGINT) == 0)
        #expect(lab.waitForExit())
        #expect(lab.exitStatus == 130, "stderr: \(lab.stderr)")
        #expect(lab.stderr.hasSuffix("swiftvisor: stopped by SIGINT\n"))
        #expect(try FileManager.default.contentsOfDirectory(atPath: dir) == [])
    }

    /// A Swift runtime trap on a vCPU thread ends the process with one line and 128 + SIGILL,
    /// instead of a backtrace and a guest that runs on.
    @Test(arguments: CLIDeviceTests.engines)
    func faultInsideTheProcessEndsIt(engine: String) throws {
        let vm = try BackgroundSwiftvisor(["run", "counter", "--engine", engine, "--crash-after-ms", "300"])
        #expect(vm.waitForExit(), "the process ended after the fault")
        #expect(vm.exitStatus == 128 + SIGILL, "stderr: \(vm.stderr)")
        #expect(vm.stderr.contains("Fatal error: crash requested by --crash-after-ms"))
        #expect(vm.stderr.hasSuffix("swiftvisor: fatal SIGILL (a Swift runtime trap or an illegal instruction) in thread 'vcpu0'; the VM is stopped and swiftvisor exits\n"))
    }
}

@Suite struct CLISnapshotSafetyTests {
    /// A snapshot whose memory fails its checksums: the report says so and the exit status too.
    @Test func inspectFailsOnDamagedMemory() throws {
        let file = NSTemporaryDirectory() + "swiftvisor-cli-damaged-\(getpid()).snap"
        defer { unlink(file) }
        let memoryOffset = try writeSampleSnapshot(path: file, pages: 64)
        let good = try swiftvisor(["snapshot", "inspect", file])
        #expect(good.status == 0, "\(good.stderr)")
        #expect(good.stdout.contains("memory checksums: OK"))
        let handle = try FileHandle(forUpdating: URL(fileURLWithPath: file))
        try handle.seek(toOffset: memoryOffset + 5 * 4096 + 17)
        handle.write(Data([0xA5]))
        try handle.close()
        let bad = try swiftvisor(["snapshot", "inspect", file])
        #expect(bad.status == 125)
        #expect(bad.stdout.contains("memory checksums: FAILED — 1 of 4 chunks corrupt (0)"))
        #expect(bad.stderr == "swiftvisor: error: \(file): guest memory fails its checksums; the snapshot is damaged\n")
    }
}
