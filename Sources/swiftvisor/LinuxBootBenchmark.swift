import ArgumentParser
import CHost
import VMM
import VirtCore
#if canImport(Glibc)
import Glibc
#endif

/// What `bench linux-boot --json` writes.
struct LinuxBootBenchmarkReport: Codable, Equatable {
    struct Boot: Codable, Equatable {
        /// Process start to the shell prompt on the serial console (nil: the boot failed).
        var seconds: Double?
        /// Why the boot did not reach the prompt, or why the guest did not power off.
        var failure: String?
        /// CPU time the process used, boot and power-off (user + system, all threads).
        var cpuSeconds: Double?
    }

    struct EngineResult: Codable, Equatable {
        /// "software" or "qemu-tcg".
        var engine: String
        /// The program's own version line (QEMU's `--version`).
        var version: String
        var boots: [Boot]
        var medianSeconds: Double?
        var minSeconds: Double?
        var maxSeconds: Double?
        var medianCPUSeconds: Double?
    }

    var benchmark = "linux-boot"
    var kernel: String
    var initrd: String
    var cmdline: String
    var memoryMiB: Int
    var runs: Int
    var engines: [EngineResult]
    /// Software engine's median over QEMU TCG's (nil without both).
    var softwareOverQEMU: Double?
    /// Why QEMU TCG is missing from the table, if it is.
    var qemuNote: String?
}

enum LinuxBootBenchmarkError: Error, CustomStringConvertible {
    case missingFile(option: String, path: String)
    case preparation(String)
    case noBoot

    var description: String {
        switch self {
        case let .missingFile(option, path): return "\(option) \(path): no such file"
        case let .preparation(why): return why
        case .noBoot: return "no boot reached the shell prompt (see the failures above)"
        }
    }
}

struct BenchLinuxBoot: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "linux-boot",
        abstract: "Time to boot Linux to its busybox shell prompt: the software engine vs QEMU TCG, same run.",
        discussion: """
            Boots the kernel and initramfs N times on the software engine ('swiftvisor run \
            --engine software', this binary) and, interleaved with those runs, with QEMU's TCG \
            ('qemu-system-x86_64 -accel tcg -cpu max', same kernel, initramfs, command line \
            and RAM) when it is installed. One boot is timed from the spawn of the process to \
            the shell prompt '/ # ' on the serial console; the guest is then told 'poweroff'. \
            A boot that shows no prompt within --timeout seconds is killed and reported.

            Without --kernel/--initrd, Scripts/linux-guest.sh (in the source tree this binary \
            was built in) fetches Debian's cloud kernel and busybox with apt-get on first use \
            and builds the initramfs (cached in .build/linux, or $LINUX_SCRATCH).

            Prints median, min and max per engine, the median CPU time of the process (user + \
            system; a loaded host stretches wall time more) and the ratio of the medians; \
            --json FILE writes the same with every boot. Without QEMU: 'apt-get install qemu-system-x86'. \
            Build with 'swift build -c release' for meaningful numbers.
            """)

    @Option(name: .long, help: ArgumentHelp("Linux kernel (bzImage); default: from Scripts/linux-guest.sh.", valueName: "path"))
    var kernel: String?

    @Option(name: .long, help: ArgumentHelp("Initramfs; default: from Scripts/linux-guest.sh.", valueName: "path"))
    var initrd: String?

    @Option(name: .long, help: "Kernel command line (both engines).")
    var cmdline = "console=ttyS0 tsc_early_khz=1000000"

    @Option(name: .long, help: "Guest RAM in MiB (both engines).")
    var memory = 256

    @Option(name: .long, help: "Boots per engine (the median counts).")
    var runs = 3

    @Option(name: .long, help: "Engines to measure: software, qemu or both.")
    var engine = "both"

    @Option(name: .long, help: "Seconds a boot may take to reach the prompt before it is killed.")
    var timeout = 120.0

    @Option(name: .long, help: ArgumentHelp("Also write results as JSON to this file.", valueName: "path"))
    var json: String?

    func validate() throws {
        guard ["software", "qemu", "both"].contains(engine) else { throw ValidationError("--engine must be software, qemu or both") }
        guard (1...100).contains(runs) else { throw ValidationError("--runs must be between 1 and 100") }
        guard (16...4096).contains(memory) else { throw ValidationError("--memory must be 16–4096 (MiB)") }
        guard timeout > 0 && timeout <= 3600 else { throw ValidationError("--timeout must be 0–3600 seconds") }
    }

    func run() throws {
        signal(SIGPIPE, SIG_IGN)  // a guest that exits before reading 'poweroff' must not end the benchmark
        let files = try Self.guestFiles(kernel: kernel, initrd: initrd, command: "bench linux-boot")
        var engines: [LinuxBootEngine] = []
        var qemuNote: String?
        if engine != "qemu" {
            engines.append(.software(executable: "/proc/self/exe"))
        }
        if engine != "software" {
            if let qemu = Self.findInPath("qemu-system-x86_64") {
                engines.append(.qemu(executable: qemu))
            } else {
                qemuNote = "qemu-system-x86_64 is not installed (apt-get install qemu-system-x86): QEMU TCG not measured"
                printError("bench linux-boot: \(qemuNote!)")
            }
        }
        if engines.isEmpty { throw ExitCode(ToolStatus.failure) }
        var boots = Array(repeating: [LinuxBootBenchmarkReport.Boot](), count: engines.count)
        for i in 0..<runs {
            for (k, e) in engines.enumerated() {  // interleaved, so load changes hit both alike
                printError("bench linux-boot: \(e.name) boot \(i + 1)/\(runs)", newline: false)
                let boot = e.boot(arguments: e.arguments(kernel: files.kernel, initrd: files.initrd, cmdline: cmdline, memoryMiB: memory),
                                  timeout: timeout)
                if let f = boot.failure { printError("bench linux-boot: \(e.name) boot \(i + 1): \(f)") }
                boots[k].append(boot)
            }
        }
        printError("", newline: false)
        let results = engines.enumerated().map { k, e in
            let times = boots[k].compactMap(\.seconds).sorted()
            let cpu = boots[k].filter { $0.seconds != nil }.compactMap(\.cpuSeconds).sorted()
            return LinuxBootBenchmarkReport.EngineResult(engine: e.name, version: e.version(), boots: boots[k],
                                                         medianSeconds: Self.median(times), minSeconds: times.first, maxSeconds: times.last,
                                                         medianCPUSeconds: Self.median(cpu))
        }
        var ratio: Double?
        if let s = results.first(where: { $0.engine == "software" })?.medianSeconds,
           let q = results.first(where: { $0.engine == "qemu-tcg" })?.medianSeconds, q > 0 {
            ratio = s / q
        }
        let report = LinuxBootBenchmarkReport(kernel: files.kernel, initrd: files.initrd, cmdline: cmdline, memoryMiB: memory, runs: runs,
                                              engines: results, softwareOverQEMU: ratio, qemuNote: qemuNote)
        print("Linux boot to the busybox prompt, \(memory) MiB, \(runs) boot\(runs == 1 ? "" : "s") per engine, interleaved")
        print("engine      median     min        max        CPU (median)  failed  version")
        for r in results {
            func s(_ v: Double?) -> String { v.map { "\($0.fixed(2)) s" } ?? "-" }
            let failed = r.boots.filter { $0.seconds == nil }.count
            print(r.engine.padded(to: 12) + s(r.medianSeconds).padded(to: 11) + s(r.minSeconds).padded(to: 11)
                  + s(r.maxSeconds).padded(to: 11) + s(r.medianCPUSeconds).padded(to: 14) + "\(failed)".padded(to: 8) + r.version)
        }
        if let ratio { print("software / QEMU TCG (medians): \(ratio.fixed(2))") }
        if let qemuNote { print("note: \(qemuNote)") }
        if let json { try writeJSON(json, report) }
        if results.allSatisfy({ $0.medianSeconds == nil }) { throw LinuxBootBenchmarkError.noBoot }
    }

    static func median(_ sorted: [Double]) -> Double? {
        guard !sorted.isEmpty else { return nil }
        let n = sorted.count
        return n % 2 == 1 ? sorted[n / 2] : (sorted[n / 2 - 1] + sorted[n / 2]) / 2
    }

    static func findInPath(_ name: String) -> String? {
        let path = getenv("PATH").map { String(cString: $0) } ?? "/usr/bin:/bin"
        for dir in path.split(separator: ":") where access("\(dir)/\(name)", X_OK) == 0 { return "\(dir)/\(name)" }
        return nil
    }

    /// --kernel/--initrd, or what Scripts/linux-guest.sh prints (`command` names who asks).
    static func guestFiles(kernel: String?, initrd: String?, command: String) throws -> (kernel: String, initrd: String) {
        if let kernel, access(kernel, R_OK) != 0 { throw LinuxBootBenchmarkError.missingFile(option: "--kernel", path: kernel) }
        if let initrd, access(initrd, R_OK) != 0 { throw LinuxBootBenchmarkError.missingFile(option: "--initrd", path: initrd) }
        if let kernel, let initrd { return (kernel, initrd) }
        guard let script = Self.linuxGuestScript() else {
            throw LinuxBootBenchmarkError.preparation("give --kernel and --initrd: Scripts/linux-guest.sh is not beside this binary's source tree")
        }
        printError("\(command): preparing the kernel and initramfs with \(script) (downloads with apt-get on first use)")
        let outcome = try HostProcess.run("/bin/bash", [script])
        var values: [String: String] = [:]
        for line in outcome.output.split(separator: "\n") {
            let parts = line.split(separator: "=", maxSplits: 1).map(String.init)
            if parts.count == 2 { values[parts[0]] = parts[1] }
        }
        guard outcome.status == 0, let k = values["kernel"], let i = values["initrd"] else {
            let why = outcome.output.split(separator: "\n").last.map(String.init) ?? "exit status \(outcome.status)"
            throw LinuxBootBenchmarkError.preparation("Scripts/linux-guest.sh failed: \(why)")
        }
        return (kernel ?? k, initrd ?? i)
    }

    /// Scripts/linux-guest.sh of the source tree: above the binary (.build/<config>/swiftvisor), else
    /// above the working directory.
    private static func linuxGuestScript() -> String? {
        var starts: [String] = []
        var buffer = [CChar](repeating: 0, count: 4096)
        let n = readlink("/proc/self/exe", &buffer, buffer.count - 1)
        if n > 0 { starts.append(String(decoding: buffer[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)) }
        if getcwd(&buffer, buffer.count) != nil { starts.append(String(cString: buffer) + "/.") }
        for start in starts {
            var dir = start
            while let slash = dir.lastIndex(of: "/"), slash != dir.startIndex {
                dir = String(dir[..<slash])
                let candidate = dir + "/Scripts/linux-guest.sh"
                if access(candidate, R_OK) == 0 { return candidate }
            }
        }
        return nil
    }
}

/// One way of booting the guest: this binary's software engine, or QEMU TCG.
enum LinuxBootEngine {
    case software(executable: String)
    case qemu(executable: String)

    static let prompt = Array("/ # ".utf8)

    var name: String {
        switch self {
        case .software: return "software"
        case .qemu: return "qemu-tcg"
        }
    }

    var executable: String {
        switch self {
        case let .software(path), let .qemu(path): return path
        }
    }

    func arguments(kernel: String, initrd: String, cmdline: String, memoryMiB: Int) -> [String] {
        switch self {
        case .software:
            // --timeout: the child ends itself too if this process is killed before it can.
            return ["run", "--engine", "software", "--memory", "\(memoryMiB)M", "--kernel", kernel, "--initrd", initrd,
                    "--cmdline", cmdline, "--timeout", "3600"]
        case .qemu:
            return ["-accel", "tcg", "-cpu", "max", "-m", "\(memoryMiB)", "-display", "none", "-serial", "stdio", "-monitor", "none",
                    "-no-reboot", "-kernel", kernel, "-initrd", initrd, "-append", cmdline]
        }
    }

    func version() -> String {
        switch self {
        case .software: return "swiftvisor run --engine software"
        case let .qemu(path):
            let out = (try? HostProcess.run(path, ["--version"]))?.output ?? ""
            return out.split(separator: "\n").first.map(String.init) ?? "qemu-system-x86_64"
        }
    }

    /// Spawns the guest, times it to the prompt, types `poweroff` and waits for the exit; a
    /// child that misses a deadline is killed (never waited on without one).
    func boot(arguments: [String], timeout: Double) -> LinuxBootBenchmarkReport.Boot {
        var input: [Int32] = [0, 0], output: [Int32] = [0, 0]
        guard pipe(&input) == 0 else { return .init(failure: "pipe: \(String(cString: strerror(errno)))") }
        guard pipe(&output) == 0 else {
            close(input[0]); close(input[1])
            return .init(failure: "pipe: \(String(cString: strerror(errno)))")
        }
        for fd in input + output { _ = fcntl(fd, F_SETFD, FD_CLOEXEC) }
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_adddup2(&actions, input[0], 0)
        posix_spawn_file_actions_adddup2(&actions, output[1], 1)
        posix_spawn_file_actions_adddup2(&actions, output[1], 2)
        var attributes = posix_spawnattr_t()
        posix_spawnattr_init(&attributes)
        defer { posix_spawnattr_destroy(&attributes) }
        _ = host_lifecycle_prepare_spawn(&attributes)
        var argv = ([executable] + arguments).map { strdup($0) } + [nil]
        defer { for p in argv { free(p) } }
        var pid: pid_t = 0
        let start = monotonicNanoseconds()
        let rc = posix_spawn(&pid, executable, &actions, &attributes, &argv, environ)
        close(input[0]); close(output[1])
        defer { close(input[1]); close(output[0]) }
        guard rc == 0 else { return .init(failure: "cannot run \(executable): \(String(cString: strerror(rc)))") }

        let reader = ConsoleReader(fd: output[0])
        let deadline = start &+ UInt64(timeout * 1e9)
        guard let promptAt = reader.wait(for: Self.prompt, until: deadline) else {
            kill(pid, SIGKILL)
            let (status, _) = Self.reap(pid)
            let why = reader.ended ? "exited (wait status \(status)) before the shell prompt" : "no shell prompt within \(timeout.significant(3)) s; killed"
            return .init(failure: why + Self.tail(reader.text))
        }
        let seconds = Double(promptAt &- start) / 1e9
        let command = Array("poweroff\n".utf8)
        _ = command.withUnsafeBytes { write(input[1], $0.baseAddress, $0.count) }
        // Power-off: the guest's shutdown path, bounded like the boot.
        let exited = reader.drain(until: monotonicNanoseconds() &+ 30_000_000_000)
        if !exited { kill(pid, SIGKILL) }
        let (_, cpu) = Self.reap(pid)
        if !exited { return .init(seconds: seconds, failure: "did not power off within 30 s; killed", cpuSeconds: cpu) }
        return .init(seconds: seconds, cpuSeconds: cpu)
    }

    /// Waits for the (ended or killed) child: its wait status and CPU seconds.
    private static func reap(_ pid: pid_t) -> (status: Int32, cpuSeconds: Double) {
        var status: Int32 = 0
        var usage = rusage()
        while wait4(pid, &status, 0, &usage) < 0 && errno == EINTR {}
        let cpu = Double(usage.ru_utime.tv_sec + usage.ru_stime.tv_sec) + Double(usage.ru_utime.tv_usec + usage.ru_stime.tv_usec) / 1e6
        return (status, cpu)
    }

    /// The last console line, for a failure message.
    private static func tail(_ text: String) -> String {
        guard let last = text.split(whereSeparator: { $0 == "\n" || $0 == "\r" }).last else { return "" }
        return " (last output: \(last.prefix(120)))"
    }
}

/// Reads a child's console from a pipe with deadlines (poll), keeping what it read.
final class ConsoleReader {
    private let fd: Int32
    private var bytes: [UInt8] = []
    private(set) var ended = false

    init(fd: Int32) { self.fd = fd }

    var text: String { String(decoding: bytes, as: UTF8.self) }

    /// Reads until `pattern` appears; the monotonic time it was read at, or nil at the
    /// deadline or end of output.
    func wait(for pattern: [UInt8], until deadline: UInt64) -> UInt64? {
        var searched = 0
        while true {
            if Self.find(pattern, in: bytes, from: searched) { return monotonicNanoseconds() }
            searched = max(0, bytes.count - pattern.count + 1)
            guard readSome(until: deadline) else { return nil }
        }
    }

    /// Reads until end of output (true) or the deadline (false).
    func drain(until deadline: UInt64) -> Bool {
        while readSome(until: deadline) {}
        return ended
    }

    /// One read within the deadline; false at the deadline or end of output.
    private func readSome(until deadline: UInt64) -> Bool {
        if ended { return false }
        let now = monotonicNanoseconds()
        guard now < deadline else { return false }
        var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
        let ms = Int32(min((deadline - now) / 1_000_000 + 1, 1000))
        let r = poll(&p, 1, ms)
        if r < 0 { return errno == EINTR }
        if r == 0 { return monotonicNanoseconds() < deadline }
        var chunk = [UInt8](repeating: 0, count: 4096)
        let n = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
        if n < 0 { return errno == EINTR || errno == EAGAIN }
        if n == 0 { ended = true; return false }
        bytes += chunk[0..<n]
        return true
    }

    private static func find(_ pattern: [UInt8], in bytes: [UInt8], from start: Int) -> Bool {
        var i = start
        while i + pattern.count <= bytes.count {
            if bytes[i..<(i + pattern.count)].elementsEqual(pattern) { return true }
            i += 1
        }
        return false
    }
}
