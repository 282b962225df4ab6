import Foundation
import Synchronization
import TestSupport
import Testing

/// Debian's cloud kernel and busybox, fetched by `Scripts/linux-guest.sh` through apt-get
/// and booted unmodified with `swiftvisor run --kernel … --initrd …` on the software engine.
enum LinuxGuest {
    struct Files { var kernel: String; var initrd: String }

    /// The script's result, once per test process: the files, or why there are none.
    static let prepared: Result<Files, PreparationFailure> = {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/bin/bash")
        p.arguments = [KVMUnitTests.repository.appendingPathComponent("Scripts/linux-guest.sh").path, "--quiet"]
        var env = ProcessInfo.processInfo.environment
        env["LINUX_SCRATCH"] = FileManager.default.temporaryDirectory.appendingPathComponent("swiftvisor-linux").path
        p.environment = env
        let out = Pipe(), err = Pipe()
        p.standardOutput = out
        p.standardError = err
        do { try p.run() } catch { return .failure(PreparationFailure(reason: "cannot run Scripts/linux-guest.sh: \(error)")) }
        let text = String(decoding: out.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        let problem = String(decoding: err.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        p.waitUntilExit()
        var values: [String: String] = [:]
        for line in text.split(separator: "\n") {
            let parts = line.split(separator: "=", maxSplits: 1).map(String.init)
            if parts.count == 2 { values[parts[0]] = parts[1] }
        }
        guard p.terminationStatus == 0, let kernel = values["kernel"], let initrd = values["initrd"] else {
            return .failure(PreparationFailure(reason: "Scripts/linux-guest.sh could not fetch the kernel and busybox (apt-get or network unavailable?): \(problem.trimmingCharacters(in: .whitespacesAndNewlines))"))
        }
        return .success(Files(kernel: kernel, initrd: initrd))
    }()

    struct PreparationFailure: Error { var reason: String }

    static var available: Bool { (try? prepared.get()) != nil }
    static var skipReason: Comment {
        if case let .failure(f) = prepared { return Comment(rawValue: f.reason) }
        return ""
    }
}

/// A `swiftvisor run --kernel` child process: its console output collected as it comes,
/// its standard input writable.
final class LinuxRun: Sendable {
    let process = Process()
    private let input = Pipe()
    private let output = Pipe()
    private let collected = Mutex<[UInt8]>([])

    init(_ files: LinuxGuest.Files, vcpus: Int = 1, cmdline: String = "console=ttyS0 tsc_early_khz=1000000") throws {
        process.executableURL = URL(fileURLWithPath: KVMUnitTests.swiftvisor)
        // The timeout bounds a stuck boot; the waits below are each bounded too.
        process.arguments = ["run", "--engine", "software", "--memory", "256M", "--vcpus", "\(vcpus)",
                             "--kernel", files.kernel, "--initrd", files.initrd, "--cmdline", cmdline, "--timeout", "600"]
        process.standardInput = input
        process.standardOutput = output
        process.standardError = output
        output.fileHandleForReading.readabilityHandler = { [collected] handle in
            let data = handle.availableData
            collected.withLock { $0.append(contentsOf: data) }
        }
        try process.run()
    }

    var text: String { String(decoding: collected.withLock { $0 }, as: UTF8.self) }

    /// Waits (bounded) until the output after `from` contains `needle`; the offset past it.
    func waitFor(_ needle: String, after from: String.Index? = nil, seconds: Double) -> String.Index? {
        var found: String.Index?
        _ = waitUntil(seconds: seconds) {
            let t = text
            let start = from.map { min($0, t.endIndex) } ?? t.startIndex
            found = t.range(of: needle, range: start..<t.endIndex)?.upperBound
            return found != nil || !process.isRunning
        }
        if found == nil {
            let t = text
            let start = from.map { min($0, t.endIndex) } ?? t.startIndex
            found = t.range(of: needle, range: start..<t.endIndex)?.upperBound
        }
        return found
    }

    func type(_ line: String) { input.fileHandleForWriting.write(Data((line + "\n").utf8)) }

    func waitForExit(seconds: Double) -> Bool {
        waitUntil(seconds: seconds) { !process.isRunning }
    }

    func kill() { if process.isRunning { process.terminate() } }

    /// The last lines of the console, for a failure message.
    var tail: String { text.split(separator: "\n", omittingEmptySubsequences: false).suffix(25).joined(separator: "\n") }
}

@Suite(.serialized, .enabled(if: LinuxGuest.available, LinuxGuest.skipReason))
struct LinuxBootTests {
    /// Boots to the busybox shell on the serial console, answers commands typed on stdin,
    /// and `poweroff -f` (ACPI S5) ends the VMM with status 0.
    @Test func bootsToAShellThatAnswersAndPowersOff() throws {
        let files = try LinuxGuest.prepared.get()
        let run = try LinuxRun(files)
        defer { run.kill() }
        let banner = run.waitFor("Linux version 6.", seconds: 120)
        try #require(banner != nil, "no kernel banner on the serial console:\n\(run.tail)")
        let initStarted = run.waitFor("Run /init as init process", after: banner, seconds: 400)
        try #require(initStarted != nil, "the kernel did not start /init:\n\(run.tail)")
        let greeting = run.waitFor("swiftvisor initramfs: 6.", after: initStarted, seconds: 120)
        try #require(greeting != nil, "the initramfs's /init did not run:\n\(run.tail)")
        let prompt = run.waitFor("# ", after: greeting, seconds: 120)
        try #require(prompt != nil, "no shell prompt:\n\(run.tail)")
        run.type("echo o''k; uname -sr")
        let answered = run.waitFor("\nok", after: prompt, seconds: 60)
        #expect(answered != nil, "the shell did not answer:\n\(run.tail)")
        #expect(run.waitFor("Linux 6.", after: answered ?? prompt, seconds: 60) != nil, "uname did not answer:\n\(run.tail)")
        run.type("grep -c processor /proc/cpuinfo")
        #expect(run.waitFor("\n1", after: answered ?? prompt, seconds: 60) != nil, "/proc/cpuinfo:\n\(run.tail)")
        run.type("poweroff -f")
        #expect(run.waitForExit(seconds: 120), "the VMM did not exit after poweroff:\n\(run.tail)")
        #expect(!run.process.isRunning && run.process.terminationStatus == 0, "exit status \(run.process.isRunning ? -1 : run.process.terminationStatus):\n\(run.tail)")
    }
}
