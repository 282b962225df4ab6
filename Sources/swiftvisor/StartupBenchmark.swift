import ArgumentParser
import FoundationEssentials
import VMM
import VirtCore
#if canImport(Glibc)
import Glibc
#endif

/// What one `run --startup-report PATH` process says about its own start (written after the
/// guest stopped, so the measurement itself costs nothing before the first instruction).
struct StartupReport: Codable {
    /// CLOCK_MONOTONIC when the guest's first instruction wrote the boot marker.
    var firstInstructionMonotonicNanoseconds: UInt64
    /// Process CPU time (all threads) used before that.
    var cpuNanosecondsBeforeFirstInstruction: UInt64
    /// VmHWM: the process's peak resident set.
    var peakRSSBytes: UInt64
    /// Guest RAM the VM actually allocated (its memfd), included in the peak.
    var guestRAMBytes: UInt64

    /// Peak RSS beyond guest RAM: what the VMM itself costs.
    var overheadBytes: UInt64 { peakRSSBytes > guestRAMBytes ? peakRSSBytes - guestRAMBytes : 0 }

    static func read(path: String) throws -> StartupReport {
        guard let data = try? Data(contentsOf: URL(fileURLWithPath: path)) else { throw StartupBenchmarkError.noReport(path) }
        return try JSONDecoder().decode(StartupReport.self, from: data)
    }

    /// VmHWM of this process from /proc/self/status, in bytes.
    static func peakRSS() -> UInt64 {
        let fd = open("/proc/self/status", O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return 0 }
        defer { close(fd) }
        var buffer = [UInt8](repeating: 0, count: 8192)
        let n = buffer.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, $0.count) }
        guard n > 0 else { return 0 }
        let text = String(decoding: buffer[0..<n], as: UTF8.self)
        for line in text.split(separator: "\n") where line.hasPrefix("VmHWM:") {
            let digits = line.dropFirst(6).filter(\.isNumber)
            return (UInt64(String(digits)) ?? 0) * 1024
        }
        return 0
    }
}

enum StartupBenchmarkError: Error, CustomStringConvertible {
    case spawnFailed(errno: Int32)
    case childFailed(engine: String, status: Int32)
    case noReport(String)

    var description: String {
        switch self {
        case let .spawnFailed(e): return "cannot start swiftvisor: \(String(cString: strerror(e)))"
        case let .childFailed(engine, status): return "'swiftvisor run hello --engine \(engine)' failed (wait status \(status))"
        case let .noReport(path): return "the run wrote no start-up report at \(path)"
        }
    }
}

struct BenchStartup: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "startup",
        abstract: "Process start to the guest's first instruction, and peak RSS beyond guest RAM, for 'run hello'.",
        discussion: """
            Starts this swiftvisor binary as 'run hello --engine E' N times per engine (64 MiB \
            guest). The time runs from just before the process is spawned to the guest's first \
            instruction, which writes the boot-marker port 0xF5; CPU time is what the process \
            used until then. Peak RSS is the process's VmHWM minus the guest RAM it allocated. \
            Medians are printed beside the microVM reference: Firecracker's specification \
            (VMM ready within 8 CPU ms, at most 5 MiB of VMM memory overhead). \
            Build with 'swift build -c release' for meaningful numbers.
            """)

    @Option(name: .long, help: "Runs per engine (the median counts).")
    var runs = 11

    @Option(name: .long, help: "Engines to measure: kvm, software or both.")
    var engine = "both"

    @Option(name: .long, help: ArgumentHelp("Also write results as JSON to this file.", valueName: "path"))
    var json: String?

    func validate() throws {
        guard ["kvm", "software", "both"].contains(engine) else { throw ValidationError("--engine must be kvm, software or both") }
        guard (1...1000).contains(runs) else { throw ValidationError("--runs must be between 1 and 1000") }
    }

    struct Row: Codable {
        var engine: String
        var runs: Int
        var medianMillisecondsToFirstInstruction: Double
        var medianCPUMillisecondsToFirstInstruction: Double
        var medianPeakRSSOverheadMiB: Double
        var maxPeakRSSOverheadMiB: Double
    }

    struct Output: Codable {
        var benchmark = "startup"
        var guest = "hello"
        var guestMemoryMiB = 64
        var referenceVMMReadyCPUMilliseconds = 8.0
        var referenceOverheadMiB = 5.0
        var rows: [Row]
    }

    func run() throws {
        var engines = engine == "both" ? ["kvm", "software"] : [engine]
        if engines.contains("kvm"), (try? EngineSelection.make(.kvm)) == nil {
            printError("bench startup: /dev/kvm is not usable here; measuring the software engine only")
            engines.removeAll { $0 == "kvm" }
            guard !engines.isEmpty else { throw ExitCode(ToolStatus.failure) }
        }
        var rows: [Row] = []
        for e in engines {
            var wall: [Double] = [], cpu: [Double] = [], rss: [Double] = []
            for i in 0..<runs {
                printError("bench startup: \(e) run \(i + 1)/\(runs)", newline: i + 1 == runs)
                let r = try measureOnce(engine: e)
                wall.append(r.wall); cpu.append(r.cpu); rss.append(r.overheadMiB)
            }
            rows.append(Row(engine: e, runs: runs, medianMillisecondsToFirstInstruction: median(wall),
                            medianCPUMillisecondsToFirstInstruction: median(cpu), medianPeakRSSOverheadMiB: median(rss),
                            maxPeakRSSOverheadMiB: rss.max() ?? 0))
        }
        print("run hello, 64 MiB guest: process start → first guest instruction, peak RSS beyond guest RAM (median of \(runs))")
        print("engine     to 1st instruction   CPU until then   RSS overhead (max)")
        for r in rows {
            print(r.engine.padded(to: 11) + "\(r.medianMillisecondsToFirstInstruction.fixed(2)) ms".padded(to: 21)
                  + "\(r.medianCPUMillisecondsToFirstInstruction.fixed(2)) ms".padded(to: 17)
                  + "\(r.medianPeakRSSOverheadMiB.fixed(1)) MiB (\(r.maxPeakRSSOverheadMiB.fixed(1)))")
        }
        print("reference  Firecracker spec: VMM ready within 8 CPU ms, ≤ 5 MiB overhead; targets here: ≤ 5 ms, ≤ 8 MiB")
        if let json { try writeJSON(json, Output(rows: rows)) }
    }

    private func median(_ xs: [Double]) -> Double {
        let s = xs.sorted()
        return s.isEmpty ? 0 : s.count % 2 == 1 ? s[s.count / 2] : (s[s.count / 2 - 1] + s[s.count / 2]) / 2
    }

    /// One child process: milliseconds to the first instruction, CPU ms, MiB overhead.
    private func measureOnce(engine: String) throws -> (wall: Double, cpu: Double, overheadMiB: Double) {
        let report = HostPaths.temporaryDirectory + "swiftvisor-startup-\(getpid()).json"
        defer { unlink(report) }
        let args = [CommandLine.arguments[0], "run", "hello", "--engine", engine, "--startup-report", report]
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 1, "/dev/null", O_WRONLY, 0)
        var cArgs = args.map { strdup($0) } + [nil]
        defer { for p in cArgs { free(p) } }
        var pid: pid_t = 0
        let start = monotonicNanoseconds()
        let rc = posix_spawn(&pid, "/proc/self/exe", &actions, nil, &cArgs, environ)
        guard rc == 0 else { throw StartupBenchmarkError.spawnFailed(errno: rc) }
        var status: Int32 = 0
        while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
        guard status == 0 else { throw StartupBenchmarkError.childFailed(engine: engine, status: status) }
        let r = try StartupReport.read(path: report)
        return (Double(r.firstInstructionMonotonicNanoseconds &- start) / 1e6, Double(r.cpuNanosecondsBeforeFirstInstruction) / 1e6,
                Double(r.overheadBytes) / 1_048_576)
    }
}
