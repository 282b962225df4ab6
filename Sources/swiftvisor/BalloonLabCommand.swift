import ArgumentParser
import FoundationEssentials
import Lab
import VMM

struct BalloonLabCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "balloon",
        abstract: "S7: a guest's page-cache miss rate as the balloon grows, beside a Zipf model; host memory given back.",
        discussion: """
            The 'zipf-cache' guest keeps a CLOCK page cache over W pages on a virtio-blk disk \
            (a temporary image the lab writes), its frames taken from the balloon driver's page \
            pool, and makes Zipf(s)-distributed accesses at CPL3. The lab inflates the balloon \
            step by step — the guest evicts cache pages to hand their frames over — and per step \
            sets the measured miss rate beside an exact LRU simulation of the same stream, Che's \
            LRU approximation and the top-C model 1 − H(C,s)/H(W,s), with the host memory the VM \
            holds and what the balloon gave back.
            """)

    @OptionGroup var options: LabOptions

    @Option(name: .long, help: "Dataset pages W on the disk (2–16384).")
    var pages = 4096

    @Option(name: .long, help: "Counted accesses per phase.")
    var accesses: UInt64 = 50_000

    @Option(name: .long, help: "Uncounted warm-up accesses per phase (default: a quarter of --accesses).")
    var warmup: UInt64?

    @Option(name: .long, help: "Zipf exponent s (0 < s ≤ 4, in steps of 0.001).")
    var zipf = 1.0

    @Option(name: .long, help: ArgumentHelp("Cache sizes to shrink to, as fractions of W, comma-separated.", valueName: "list"))
    var fractions = "0.75,0.5,0.25,0.1,0.05"

    @Flag(name: .long, help: "Do not deflate the balloon again at the end.")
    var noDeflate = false

    @Option(name: .long, help: "Seed of the guest's access stream.")
    var seed: UInt64 = 1

    func parsedFractions() throws -> [Double] {
        let list = fractions.split(separator: ",").map { Double($0.trimmed) }
        guard !list.isEmpty, list.allSatisfy({ $0 != nil && $0! > 0 && $0! <= 1 }) else {
            throw ValidationError("--fractions must be comma-separated numbers in (0, 1]")
        }
        return list.map { $0! }
    }

    func validate() throws {
        guard (2...16384).contains(pages) else { throw ValidationError("--pages must be 2–16384") }
        guard accesses > 0 else { throw ValidationError("--accesses must be positive") }
        guard zipf > 0, zipf <= 4 else { throw ValidationError("--zipf must be in (0, 4]") }
        _ = try parsedFractions()
    }

    func run() throws {
        var lab = BalloonLab(engine: options.resolvedEngine())
        lab.datasetPages = pages
        lab.accesses = accesses
        lab.warmupAccesses = warmup
        lab.zipfExponent = zipf
        lab.cacheFractions = try parsedFractions()
        lab.deflateAtEnd = !noDeflate
        lab.seed = seed
        printError("lab balloon: \(lab.engine.rawValue) engine, \(pages) pages, Zipf s=\(zipf), \(accesses) accesses per phase…")
        let result = try lab.run(progress: .onTerminal("lab balloon", report: options.report))
        try options.emit(result, name: "balloon-\(lab.engine.rawValue)", table: BalloonLab.table(result), chart: BalloonLab.chart(result))
    }
}
