import ArgumentParser
import Lab
import VMM
import VirtCore

struct BenchLinuxRestore: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "linux-restore",
        abstract: "Restore of a booted Linux to an answered command (the microVM use case), eager and lazy, beside the 50 ms target.",
        discussion: """
            Boots the kernel and initramfs (default: the ones Scripts/linux-guest.sh prints, Debian's cloud \
            kernel and a busybox shell, fetched on first use) to the shell prompt on --engine, snapshots it into --snapshot-dir \
            (a tmpfs by default), then restores it --runs times each way, alternating lazy and eager. Each \
            restore is timed from opening the file to the answer of 'echo TOKEN-$((6*7))' typed on the \
            restored console: "build" is the machine made (RAM read and verified, or armed for \
            userfaultfd), "answer" the shell's reply; "CPU" is the process's CPU time over the same span \
            (all threads). Lazy restores also count the faults served and the pages placed (the first \
            fault in a 64 KiB chunk places its non-zero pages too); the last two columns say how much \
            guest code the answer took and how many blocks the software engine translated for it \
            (a restored VM starts with an empty translation cache). The last row is the booted VM \
            answering the same command before the snapshot (its second command): what no restore beats. \
            Before that the benchmark turns the terminal's echo off (stty -echo), so busybox reads each \
            line whole, as a program driving a microVM's console sends it: its line editor would sleep \
            20 ms after every line for a terminal's reply to its cursor query (ESC [ 6 n), guest time \
            that no VMM shortens.
            """)

    @Option(name: .long, help: ArgumentHelp("The kernel (bzImage or vmlinux); default: from Scripts/linux-guest.sh.", valueName: "file"))
    var kernel: String?

    @Option(name: .long, help: ArgumentHelp("The initramfs, whose /init starts a shell on ttyS0; default: from Scripts/linux-guest.sh.", valueName: "file"))
    var initrd: String?

    @Option(name: .long, help: ArgumentHelp("The kernel's command line.", valueName: "text"))
    var cmdline = "console=ttyS0"

    @Option(name: .long, help: ArgumentHelp("Guest RAM.", valueName: "size"))
    var memory = MemoryArgument(argument: "256M")!

    @Option(name: .long, help: "Restores of each kind (the median counts).")
    var runs = 5

    @Option(name: .long, help: ArgumentHelp("Engine: software (default) or kvm where the host's KVM runs the kernel.", valueName: "engine"))
    var engine: EngineChoice = .software

    @Option(name: .long, help: ArgumentHelp("Directory for the snapshot file.", valueName: "dir"))
    var snapshotDir = "/dev/shm"

    @Option(name: .long, help: ArgumentHelp("Also write results as JSON to this file.", valueName: "path"))
    var json: String?

    func validate() throws {
        guard (1...100).contains(runs) else { throw ValidationError("--runs must be 1–100") }
    }

    func run() throws {
        let files = try BenchLinuxBoot.guestFiles(kernel: kernel, initrd: initrd, command: "bench linux-restore")
        var benchmark = LinuxRestoreBenchmark(kernel: files.kernel, initrd: files.initrd)
        benchmark.commandLine = cmdline
        benchmark.memory = memory.bytes
        benchmark.runs = runs
        benchmark.directory = snapshotDir
        let result = try benchmark.run(engine: engine, progress: LabProgress("bench linux-restore") { line in printError(line ?? "", newline: false) })
        func median(_ xs: [Double]) -> Double { let s = xs.sorted(); return s.isEmpty ? 0 : s[s.count / 2] }
        print("Linux restore to an answered command (\(result.engine) engine, \(MemorySize.format(result.memoryBytes)) RAM, "
              + "booted to the prompt in \(result.bootToPromptSeconds.fixed(1)) s (CPU \(result.bootCPUSeconds.fixed(1)) s), snapshot \(result.snapshotBytes >> 20) MiB in \(snapshotDir))")
        let table = LabTable(
            title: "", columns: ["restore", "build ms (median)", "answer ms (median)", "answer ms (min–max)", "CPU ms (median)", "faults", "pages loaded", "guest instructions", "blocks translated", "target", "met"],
            rows: [true, false].map { lazy in
                let rs = result.restores.filter { $0.lazy == lazy }
                let answers = rs.map(\.answerMilliseconds)
                let answer = median(answers)
                return [lazy ? "lazy" : "eager", median(rs.map(\.buildMilliseconds)).fixed(1), answer.fixed(1),
                        "\(answers.min()?.fixed(1) ?? "-")–\(answers.max()?.fixed(1) ?? "-")",
                        median(rs.map(\.cpuMilliseconds)).fixed(1),
                        lazy ? String(Int(median(rs.map { Double($0.pagesFaultedIn) }))) : "-",
                        lazy ? String(Int(median(rs.map { Double($0.pagesLoaded) }))) : "-",
                        rs.last?.execution.map { String($0.instructions) } ?? "-",
                        rs.last?.execution.map { String($0.blocksTranslated) } ?? "-",
                        lazy ? "≤ 50 ms" : "—", lazy ? (answer <= 50 ? "yes" : "no") : "—"]
            } + [["warm (no restore)", "-", result.warm.answerMilliseconds.fixed(1), "-", result.warm.cpuMilliseconds.fixed(1), "-", "-",
                  result.warm.execution.map { String($0.instructions) } ?? "-", result.warm.execution.map { String($0.blocksTranslated) } ?? "-",
                  "—", "—"]])
        print(table.text)
        if let path = json { try writeJSON(path, result) }
    }
}
