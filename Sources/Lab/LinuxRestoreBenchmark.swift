import FoundationEssentials
import Synchronization
#if canImport(Glibc)
import Glibc
#endif
import VirtCore
import VMM

/// The microVM use case measured: a Linux kernel booted to its busybox shell is snapshotted
/// at the prompt; each restore (eager and lazy, alternating) is timed from opening the file
/// to the restored shell's answer to a command typed on its console.
package struct LinuxRestoreBenchmark: Sendable {
    package var kernel: String
    package var initrd: String
    package var commandLine = "console=ttyS0"
    package var memory: UInt64 = 256 << 20
    package var runs = 5
    /// Where the snapshot file goes (a tmpfs by default: the restore then measures the VMM, not the disk).
    package var directory = "/dev/shm"
    package var bootTimeoutSeconds: Double = 600

    package init(kernel: String, initrd: String) {
        self.kernel = kernel
        self.initrd = initrd
    }

    package struct Restore: Codable, Sendable {
        package var lazy: Bool
        /// Opening the file to a machine ready to run (RAM read and verified, or armed for faults).
        package var buildMilliseconds: Double
        /// Opening the file to the answer on the restored console.
        package var answerMilliseconds: Double
        /// CPU time the process used over the same span (all threads: vCPU, fault handler, host).
        package var cpuMilliseconds: Double
        /// Faults served before the answer (lazy restores: guest accesses that waited for a page).
        package var pagesFaultedIn: UInt64
        /// Pages placed in RAM before the answer (lazy restores: the faulting pages and their
        /// 64 KiB chunks' other non-zero pages).
        package var pagesLoaded: UInt64
        /// What the engine ran, where it counts instructions (software engine).
        package var execution: ExecutionCounts?
    }

    /// The booted VM answering the same command before the snapshot (its second command,
    /// so the path is translated already): what no restore can beat.
    package struct WarmAnswer: Codable, Sendable {
        package var answerMilliseconds: Double
        package var cpuMilliseconds: Double
        package var execution: ExecutionCounts?
    }

    package struct Result: Codable, Sendable {
        package var engine: String
        package var memoryBytes: UInt64
        package var bootToPromptSeconds: Double
        package var bootCPUSeconds: Double
        package var snapshotBytes: UInt64
        package var warm: WarmAnswer
        package var restores: [Restore]
    }

    package enum Failure: Error, CustomStringConvertible {
        case unreadable(String, errno: Int32)
        case noPrompt(seconds: Double, lastOutput: String)
        case noAnswer(lazy: Bool, lastOutput: String)

        package var description: String {
            switch self {
            case let .unreadable(path, e): return "cannot read \(path): \(String(cString: strerror(e)))"
            case let .noPrompt(seconds, last): return "no shell prompt within \(Int(seconds)) s; last output:\n\(last)"
            case let .noAnswer(lazy, last): return "the \(lazy ? "lazily" : "eagerly") restored shell did not answer within 60 s; last output:\n\(last)"
            }
        }
    }

    /// Boots once on `engine`, snapshots at the prompt, then restores `runs` times each way.
    package func run(engine: EngineChoice, progress: LabProgress = .silent) throws -> Result {
        let kernelBytes = try Self.read(kernel), initrdBytes = try Self.read(initrd)
        let snapshotPath = directory + "/swiftvisor-linux-restore-\(getpid()).snap"
        defer { unlink(snapshotPath) }
        progress.begin(steps: 1 + 2 * runs)
        progress.step("booting \(kernel) to its shell prompt")
        let console = ConsoleText()
        let configuration = MachineConfiguration(memorySize: memory, commandLine: commandLine, timeoutSeconds: bootTimeoutSeconds)
        let started = monotonicNanoseconds(), cpuStarted = processCPUNanoseconds()
        let machine = try PCPlatform.machine(kernel: kernelBytes, modules: [(initrdBytes, "")], configuration: configuration,
                                             engine: try EngineSelection.make(engine), serialOutput: console.append)
        let runner = HostThread(name: "linux") { _ = try? machine.run() }
        defer { machine.stop(); runner.join() }
        guard console.wait(for: "/ # ", seconds: bootTimeoutSeconds) else {
            throw Failure.noPrompt(seconds: bootTimeoutSeconds, lastOutput: String(console.text.suffix(1500)))
        }
        let bootSeconds = Double(monotonicNanoseconds() - started) / 1e9
        let bootCPUSeconds = Double(processCPUNanoseconds() - cpuStarted) / 1e9
        // The terminal's echo off: busybox then reads each line whole (as a program driving a
        // microVM's console would send it) instead of through its line editor, which after
        // every line sleeps 20 ms waiting for a terminal's reply to its cursor query (ESC [ 6 n)
        // — guest time no VMM can shorten. The warm row shows what is left for a command.
        try Self.type("stty -echo; echo echo-$((1+1))-off", until: "echo-2-off\r\n/ # ", on: machine, console)
        var warm = WarmAnswer(answerMilliseconds: 0, cpuMilliseconds: 0, execution: nil)
        for k in 1...2 {
            let counts = machine.executionCounts
            let t0 = monotonicNanoseconds(), cpu0 = processCPUNanoseconds()
            // The answer, then the next prompt: the snapshot is taken at a prompt again.
            try Self.type("echo warm\(k)-$((6*7))", until: "warm\(k)-42", on: machine, console)
            warm = WarmAnswer(answerMilliseconds: Double(monotonicNanoseconds() - t0) / 1e6,
                              cpuMilliseconds: Double(processCPUNanoseconds() - cpu0) / 1e6,
                              execution: machine.executionCounts.flatMap { after in counts.map { after - $0 } })
            guard console.wait(for: "warm\(k)-42\r\n/ # ", seconds: 60) else {
                throw Failure.noPrompt(seconds: 60, lastOutput: String(console.text.suffix(1500)))
            }
        }
        _ = try machine.snapshot(to: snapshotPath)
        machine.stop()
        runner.join()
        let snapshot = try SnapshotFile(path: snapshotPath)
        let fileBytes = UInt64(snapshot.fileSize)

        var restores: [Restore] = []
        for run in 0..<runs {
            for lazy in [true, false] {
                progress.step("restore \(run + 1) of \(runs), \(lazy ? "lazy" : "eager")")
                restores.append(try restore(snapshotPath, engine: engine, lazy: lazy, token: "restored-\(run)\(lazy ? "l" : "e")"))
            }
        }
        progress.finish()
        return Result(engine: engine.rawValue, memoryBytes: memory, bootToPromptSeconds: bootSeconds, bootCPUSeconds: bootCPUSeconds,
                      snapshotBytes: fileBytes, warm: warm, restores: restores)
    }

    private func restore(_ path: String, engine: EngineChoice, lazy: Bool, token: String) throws -> Restore {
        let out = ConsoleText()
        let started = monotonicNanoseconds(), cpuStarted = processCPUNanoseconds()
        let clone = try Machine(restoring: try SnapshotFile(path: path), engine: try EngineSelection.make(engine), lazy: lazy,
                                timeoutSeconds: 120, serialOutput: out.append)
        let built = monotonicNanoseconds()
        // The answer is made by the shell's arithmetic, so no echo of the command could match it.
        clone.uart.enqueueInput(Array("echo \(token)-$((6*7))\n".utf8))
        let runner = HostThread(name: "linux-restore") { _ = try? clone.run() }
        let answered = out.wait(for: "\(token)-42", seconds: 60)
        let finished = monotonicNanoseconds(), cpu = processCPUNanoseconds() - cpuStarted
        let faults = clone.lazyRestoreFaults, loaded = clone.lazyRestorePagesLoaded
        clone.stop()
        runner.join()
        guard answered else { throw Failure.noAnswer(lazy: lazy, lastOutput: String(out.text.suffix(1500))) }
        return Restore(lazy: lazy, buildMilliseconds: Double(built - started) / 1e6, answerMilliseconds: Double(finished - started) / 1e6,
                       cpuMilliseconds: Double(cpu) / 1e6, pagesFaultedIn: faults, pagesLoaded: loaded, execution: clone.executionCounts)
    }

    /// Types `command` on the booted shell and waits for `answer` in its output.
    private static func type(_ command: String, until answer: String, on machine: Machine, _ console: ConsoleText) throws {
        machine.uart.enqueueInput(Array((command + "\n").utf8))
        guard console.wait(for: answer, seconds: 60) else {
            throw Failure.noPrompt(seconds: 60, lastOutput: String(console.text.suffix(1500)))
        }
    }

    private static func read(_ path: String) throws -> [UInt8] {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw Failure.unreadable(path, errno: errno) }
        defer { close(fd) }
        var bytes: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 1 << 20)
        while true {
            let n = chunk.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, $0.count) }
            if n < 0 { throw Failure.unreadable(path, errno: errno) }
            if n == 0 { return bytes }
            bytes += chunk[0..<n]
        }
    }
}

/// Serial output collected as it arrives, with a wait for a string to appear in it.
private final class ConsoleText: Sendable {
    private let bytes = Mutex<[UInt8]>([])

    func append(_ byte: UInt8) { bytes.withLock { $0.append(byte) } }

    var text: String { String(decoding: bytes.withLock { $0 }, as: UTF8.self) }

    /// Waits until `needle` is in the output, looking every 100 µs (a bound on the error
    /// this adds to a measurement) at what arrived since the last look.
    func wait(for needle: String, seconds: Double) -> Bool {
        let deadline = monotonicNanoseconds() + UInt64(seconds * 1e9)
        let target = Array(needle.utf8)
        var searched = 0
        while true {
            let found = bytes.withLock { b -> Bool in
                defer { searched = max(0, b.count - target.count + 1) }
                guard b.count >= target.count, searched <= b.count - target.count else { return false }
                return (searched...(b.count - target.count)).contains { b[$0..<$0 + target.count].elementsEqual(target) }
            }
            if found { return true }
            if monotonicNanoseconds() >= deadline { return false }
            usleep(100)
        }
    }
}
