import Foundation
import TestSupport
import Testing

/// Debian's cloud kernel and busybox, fetched by `Scripts/linux-guest.sh` through apt-get
/// and booted unmodified with `swiftvisor run --kernel … --initrd …` on the software engine.
enum LinuxGuest {
    struct Files {
        var kernel: String
        var initrd: String
        /// Every `key=value` line the script printed (e.g. `rootfs=`).
        var outputs: [String: String] = [:]
    }

    /// The script's result, once per test process: the files, or why there are none.
    static let prepared = prepare(script: "linux-guest.sh", initrdKey: "initrd")

    /// Runs `Scripts/<script> --quiet` and reads its `kernel=` and `<initrdKey>=` lines.
    /// One script at a time: they build on each other in the same scratch directory.
    static func prepare(script: String, initrdKey: String) -> Result<Files, PreparationFailure> {
        scriptLock.lock()
        defer { scriptLock.unlock() }
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/bin/bash")
        p.arguments = [KVMUnitTests.repository.appendingPathComponent("Scripts/\(script)").path, "--quiet"]
        var env = ProcessInfo.processInfo.environment
        env["LINUX_SCRATCH"] = FileManager.default.temporaryDirectory.appendingPathComponent("swiftvisor-linux").path
        p.environment = env
        let out = Pipe(), err = Pipe()
        p.standardOutput = out
        p.standardError = err
        do { try p.run() } catch { return .failure(PreparationFailure(reason: "cannot run Scripts/\(script): \(error)")) }
        let text = String(decoding: out.fileHandleForReading.readToEndRetrying(), as: UTF8.self)
        let problem = String(decoding: err.fileHandleForReading.readToEndRetrying(), as: UTF8.self)
        p.waitUntilExit()
        var values: [String: String] = [:]
        for line in text.split(separator: "\n") {
            let parts = line.split(separator: "=", maxSplits: 1).map(String.init)
            if parts.count == 2 { values[parts[0]] = parts[1] }
        }
        guard p.terminationStatus == 0, let kernel = values["kernel"], let initrd = values[initrdKey] else {
            return .failure(PreparationFailure(reason: "Scripts/\(script) could not fetch the kernel and busybox (apt-get or network unavailable?): \(problem.trimmingCharacters(in: .whitespacesAndNewlines))"))
        }
        return .success(Files(kernel: kernel, initrd: initrd, outputs: values))
    }

    struct PreparationFailure: Error { var reason: String }
    private static let scriptLock = NSLock()

    static var available: Bool { (try? prepared.get()) != nil }
    static var skipReason: Comment {
        if case let .failure(f) = prepared { return Comment(rawValue: f.reason) }
        return ""
    }
}

/// A `swiftvisor run --kernel` child process: its console output collected as it comes,
/// its standard input a pipe (the console's input).
final class LinuxRun: LinuxConsole, Sendable {
    let process = Process()
    private let input = Pipe()
    private let output = Pipe()
    private let console = SerialCapture()

    init(_ files: LinuxGuest.Files, vcpus: Int = 1, cmdline: String = "console=ttyS0",
         extraArguments: [String] = []) throws {
        process.executableURL = URL(fileURLWithPath: KVMUnitTests.swiftvisor)
        // The timeout bounds a stuck boot; the waits below are each bounded too.
        process.arguments = ["run", "--engine", "software", "--memory", "256M", "--vcpus", "\(vcpus)",
                             "--kernel", files.kernel, "--initrd", files.initrd, "--cmdline", cmdline, "--timeout", "600"] + extraArguments
        process.standardInput = input
        process.standardOutput = output
        process.standardError = output
        try process.run()
        // A thread of its own reads the console (not a readabilityHandler: Foundation's
        // traps when a signal interrupts its read).
        Thread { [console, handle = output.fileHandleForReading] in
            while true {
                let chunk = handle.readSomeRetrying()
                if chunk.isEmpty { return }
                for byte in chunk { console.append(byte) }
            }
        }.start()
    }

    var text: String { console.text }

    /// Types `line` and a newline on the console (the child's standard input).
    func type(_ line: String) {
        input.fileHandleForWriting.write(Data((line + "\n").utf8))
    }

    var isRunning: Bool { process.isRunning }

    func kill() { if process.isRunning { process.terminate() } }

    /// Types each command at the prompt after `at` and expects its answer; the last prompt.
    func answers(_ pairs: [(command: String, expected: String)], after at: String.Index?) throws -> String.Index? {
        var at = at
        for (command, expected) in pairs {
            type(command)
            let answered = waitFor(command, after: at, seconds: 120)
            try #require(answered != nil, "\(command) not echoed:\n\(tail)")
            #expect(waitFor(expected, after: answered, seconds: 120) != nil, "\(command): no \"\(expected)\":\n\(tail)")
            at = prompt(after: answered)
            try #require(at != nil, "no prompt after \(command):\n\(tail)")
        }
        return at
    }

    /// `poweroff` at the prompt after `at`: ACPI S5 ends `swiftvisor run` with status 0, and
    /// the kernel never panicked.
    func powersOffCleanly(after at: String.Index?) throws {
        type("poweroff")
        #expect(waitFor("reboot: Power down", after: at, seconds: 120) != nil, "\(tail)")
        _ = waitUntil(seconds: 120) { !process.isRunning }
        try #require(!process.isRunning, "swiftvisor still runs after poweroff:\n\(tail)")
        #expect(process.terminationStatus == 0, "exit status \(process.terminationStatus):\n\(tail)")
        #expect(!text.contains("Kernel panic"), "\(tail)")
    }
}

@Suite(.serialized, .enabled(if: LinuxGuest.available, LinuxGuest.skipReason))
struct LinuxBootTests {
    /// The kernel decompresses itself, prints its banner on COM1, calibrates its TSC against
    /// the 8254 (the engine's 1 GHz, with no `tsc_early_khz` on the command line), finds its
    /// memory (e820), ACPI tables (MADT: the I/O APIC) and clock (RTC), unpacks the
    /// initramfs, registers ttyS0 on IRQ 4 and starts /init.
    @Test func bootsToInit() throws {
        let files = try LinuxGuest.prepared.get()
        let run = try LinuxRun(files)
        defer { run.kill() }
        let banner = run.waitFor("Linux version 6.", seconds: 180)
        try #require(banner != nil, "no kernel banner on the serial console:\n\(run.tail)")
        let calibrated = run.waitFor("tsc: Fast TSC calibration using PIT", after: banner, seconds: 120)
        try #require(calibrated != nil, "the kernel did not calibrate its TSC against the PIT:\n\(run.tail)")
        let detected = run.waitFor(" MHz processor", after: calibrated, seconds: 60)
        try #require(detected != nil, "no \"tsc: Detected … MHz processor\":\n\(run.tail)")
        let mhz = Self.detectedMegahertz(in: run.text)
        try #require(mhz != nil, "unreadable TSC rate:\n\(run.tail)")
        // quick_pit_calibrate stops once its error bound is below 500 ppm.
        #expect(abs(mhz! - 1000) <= 0.5, "TSC calibrated at \(mhz!) MHz, the engine's TSC runs at 1000 MHz")
        for milestone in ["ACPI: Using IOAPIC for interrupt routing", "rtc_cmos rtc_cmos: setting system clock",
                          "Freeing initrd memory", "serial8250: ttyS0 at I/O 0x3f8 (irq = 4", "Run /init as init process"] {
            #expect(run.waitFor(milestone, after: banner, seconds: 400) != nil, "missing \"\(milestone)\":\n\(run.tail)")
        }
        #expect(!run.text.contains("Kernel panic"), "\(run.tail)")
    }

    /// The number in the kernel's `tsc: Detected 999.993 MHz processor`.
    static func detectedMegahertz(in text: String) -> Double? {
        guard let line = text.split(separator: "\n").first(where: { $0.contains("tsc: Detected") && $0.contains("MHz processor") }),
              let words = line.components(separatedBy: "tsc: Detected ").last?.split(separator: " ").first else { return nil }
        return Double(words)
    }

    /// Busybox's shell on ttyS0 answers commands typed on the console (standard input of
    /// `swiftvisor run`), and `poweroff` powers the machine off through ACPI S5: the VMM
    /// exits with status 0.
    @Test func shellAnswersAndPowersOff() throws {
        let files = try LinuxGuest.prepared.get()
        let run = try LinuxRun(files)
        defer { run.kill() }
        let started = run.waitFor("Run /init as init process", seconds: 400)
        try #require(started != nil, "the kernel did not start /init:\n\(run.tail)")
        let at = run.prompt(after: started)
        try #require(at != nil, "no shell prompt on ttyS0:\n\(run.tail)")
        // Each command's output follows the echo of its line; the next prompt ends it.
        let last = try run.answers([("echo ok-$((6*7))", "ok-42"), ("uname -a", "Linux (none) 6."),
                                    ("cat /proc/cpuinfo", "processor\t: 0"), ("cat /proc/cpuinfo", "Swiftvisor software x86-64")], after: at)
        try run.powersOffCleanly(after: last)
    }

    /// Two vCPUs: the kernel starts the second through INIT and STARTUP (its trampoline runs
    /// from real mode through protected mode into long mode), `nproc` answers 2 and
    /// /proc/cpuinfo lists both, and `poweroff` from the shell ends the VMM with status 0.
    /// Each wait is bounded: a CPU that never comes up fails here with the console's tail.
    @Test func twoVCPUsBootAndPowerOff() throws {
        let files = try LinuxGuest.prepared.get()
        let run = try LinuxRun(files, vcpus: 2)
        defer { run.kill() }
        let booting = run.waitFor("x86: Booting SMP configuration", seconds: 300)
        try #require(booting != nil, "the kernel did not start its secondary CPUs:\n\(run.tail)")
        let up = run.waitFor("smp: Brought up 1 node, 2 CPUs", after: booting, seconds: 120)
        try #require(up != nil, "the second CPU did not come up:\n\(run.tail)")
        let started = run.waitFor("Run /init as init process", after: up, seconds: 400)
        try #require(started != nil, "the kernel did not start /init:\n\(run.tail)")
        let at = run.prompt(after: started)
        try #require(at != nil, "no shell prompt on ttyS0:\n\(run.tail)")
        let last = try run.answers([("nproc", "\r\n2\r\n"), ("cat /proc/cpuinfo", "processor\t: 1")], after: at)
        try run.powersOffCleanly(after: last)
    }
}
