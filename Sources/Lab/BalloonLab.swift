import Devices
import Dispatch
import FoundationEssentials
#if canImport(Glibc)
import Glibc
#endif
import GuestImages
import VirtCore
import VMM

/// Scenario S7: what ballooning costs a guest, and what it gives the host. The `zipf-cache`
/// guest keeps a page cache over a dataset of W pages on a virtio-blk disk (the backing
/// store); its cache frames are the balloon driver's page pool, so each balloon the host
/// asks for is paid for by evicting cache pages. Per balloon size the lab sets the
/// guest's measured miss rate under a Zipf(s) access stream beside two models, and the
/// host memory the VM holds beside what the balloon gave back.
package struct BalloonLab: Sendable {
    package var engine: EngineChoice
    /// W: dataset pages on the disk (2…16384).
    package var datasetPages = 4096
    /// Counted accesses per phase.
    package var accesses: UInt64 = 50_000
    /// Uncounted accesses before them (nil: a quarter of `accesses`), so each phase is
    /// measured with the cache settled at its new size.
    package var warmupAccesses: UInt64?
    /// Zipf exponent s (the guest takes it in thousandths).
    package var zipfExponent = 1.0
    /// Cache sizes to shrink to, as fractions of W, after a first phase with no balloon.
    package var cacheFractions: [Double] = [0.75, 0.5, 0.25, 0.1, 0.05]
    /// End with the balloon deflated to 0 (the cache gets its frames back, empty).
    package var deflateAtEnd = true
    package var seed: UInt64 = 1
    package var directory = HostPaths.temporaryDirectory

    package init(engine: EngineChoice) { self.engine = engine }

    package struct Phase: Codable, Sendable {
        package var phase: Int
        /// "no balloon", "inflate" or "deflate".
        package var step: String
        package var targetPages: UInt32
        /// Pages in the balloon as the guest reported them.
        package var balloonPages: UInt32
        /// C: cache frames, and the pages in them.
        package var cachePages: UInt32
        package var residentPages: UInt32
        package var accesses: UInt64
        package var misses: UInt64
        package var missRate: Double
        /// The host's replay of the guest's CLOCK cache over the same access stream.
        package var replayedClockMisses: UInt64
        /// An exact LRU cache of C pages fed the same stream.
        package var simulatedLRUMisses: UInt64
        package var simulatedMissRateLRU: Double
        /// Che's approximation for an LRU cache of C pages.
        package var predictedMissRateLRU: Double
        /// The cache holding exactly the C most popular pages: 1 − H(C,s)/H(W,s).
        package var predictedMissRateTopC: Double
        /// 2σ of the measured miss rate from sampling alone (binomial, at the LRU prediction).
        package var samplingError2Sigma: Double
        /// Cache pages the guest evicted this phase to hand their frames to the balloon.
        package var evictedForBalloon: UInt64
        /// `GuestMemory.allocatedBytes` at the end of the phase.
        package var hostAllocatedBytes: UInt64
        /// The balloon device's count of host memory its discards gave back (cumulative).
        package var returnedBytes: UInt64
        package var discardedBytes: UInt64
        package var seconds: Double
    }

    package struct Result: Codable, Sendable {
        package var engine: String
        package var cpl: Int
        package var drivers: String
        package var datasetPages: Int
        package var zipfExponent: Double
        package var accessesPerPhase: UInt64
        package var warmupAccessesPerPhase: UInt64
        package var ramBytes: UInt64
        /// Cache frames the guest started with (every page of its pool, up to its limit).
        package var cacheFrames: UInt32
        /// Cache frames plus the pool's free pages: what a balloon can take before the cache is empty.
        package var poolPages: UInt32
        /// Host memory after the guest warmed its cache, before the first phase.
        package var hostAllocatedBytesAtStart: UInt64
        /// Probability of the most popular page: the guest's fixed-point CDF vs 1/H(W,s).
        package var guestTopPagePpm: Int
        package var modelTopPagePpm: Double
        package var badStamps: UInt64
        /// Whether the host's replay of the guest's CLOCK cache counted the same misses in every phase.
        package var replayMatchesGuest: Bool
        package var phases: [Phase]
        package var guestOutput: String
    }

    /// Stamps page i of a raw image: first word i, last word i ^ "ZIPFCACH".
    static let stampMagic: UInt64 = 0x5A49_5046_4341_4348
    static let pageSize = 4096

    /// Drives the phases from the guest's writes to port 0x81, on the vCPU thread: records
    /// host memory and the balloon's counters, then sets the next target.
    // SAFETY: its recorded marks are behind `lock`; `balloon` is set before the machine runs;
    // `progress` is used only by the one vCPU while the lab's thread waits in `run()`.
    final class Controller: PortIODevice, @unchecked Sendable {
        var name: String { "balloon-lab-controller" }
        struct Mark { var allocated: UInt64; var stats: VirtioBalloonStatistics; var nanoseconds: UInt64 }
        let memory: GuestMemory
        let schedule: @Sendable (UInt32) -> [UInt32]
        let progress: LabProgress
        var balloon: VirtioBalloon?
        private let lock = HostLock()
        private var _targets: [UInt32] = []
        private var _poolPages: UInt32?
        private var _ready: Mark?
        private var _marks: [Mark] = []

        init(memory: GuestMemory, progress: LabProgress, schedule: @escaping @Sendable (UInt32) -> [UInt32]) {
            self.memory = memory; self.progress = progress; self.schedule = schedule
        }

        var targets: [UInt32] { lock.withLock { _targets } }
        var poolPages: UInt32? { lock.withLock { _poolPages } }
        var ready: Mark? { lock.withLock { _ready } }
        var marks: [Mark] { lock.withLock { _marks } }

        func portRead(offset: UInt16, size: UInt8) -> UInt32 { 0 }
        func portWrite(offset: UInt16, size: UInt8, value: UInt32) {
            guard let balloon else { return }
            let mark = Mark(allocated: memory.allocatedBytes, stats: balloon.statistics, nanoseconds: monotonicNanoseconds())
            let (phase, phases, next): (Int, Int, UInt32) = lock.withLock {
                if value & 0x8000_0000 != 0 {
                    _poolPages = value & 0x7FFF_FFFF
                    _targets = schedule(value & 0x7FFF_FFFF)
                    _ready = mark
                    return (0, _targets.count, _targets.first ?? VirtioBalloon.quitTarget)
                }
                _marks.append(mark)
                let phase = Int(value) + 1
                return (phase, _targets.count, phase < _targets.count ? _targets[phase] : VirtioBalloon.quitTarget)
            }
            if phase == 0 { progress.begin(steps: phases) }
            if phase < phases { progress.step("phase \(phase): " + (next == 0 ? "no balloon" : "balloon of \(next) pages")) }
            balloon.setTarget(pages: next)
        }
    }

    /// Balloon targets for a guest whose cache frames and free pool pages add up to
    /// `poolPages`: none, then a cache of each fraction of W (at least one frame left), then
    /// none again; consecutive repeats dropped (the guest waits for the target to change).
    package func targets(poolPages frames: UInt32) -> [UInt32] {
        var list: [UInt32] = [0]
        for f in cacheFractions {
            let cache = max(1, Int((f * Double(datasetPages)).rounded()))
            list.append(UInt32(clamping: max(0, min(Int(frames) - 1, Int(frames) - cache))))
        }
        if deflateAtEnd { list.append(0) }
        var out: [UInt32] = []
        for t in list where t != out.last { out.append(t) }
        return out
    }

    /// Guest RAM: the dataset, plus room for the image, its tables and the pool's bitmaps,
    /// in the machine's 2 MiB steps.
    var ramBytes: UInt64 {
        let want = UInt64(datasetPages) * UInt64(Self.pageSize) + (4 << 20)
        return (want + (2 << 20) - 1) / (2 << 20) * (2 << 20)
    }

    /// One step per phase (balloon target) reported to `progress`, from the guest's marks.
    package func run(progress: LabProgress = .silent) throws -> Result {
        guard (2...16384).contains(datasetPages) else { throw LabError.badParameters("dataset pages must be 2–16384") }
        guard zipfExponent > 0, zipfExponent <= 4 else { throw LabError.badParameters("the Zipf exponent must be in (0, 4]") }
        guard accesses > 0 else { throw LabError.badParameters("accesses must be positive") }
        guard cacheFractions.allSatisfy({ $0 > 0 && $0 <= 1 }) else { throw LabError.badParameters("cache fractions must be in (0, 1]") }
        let smilli = Int((zipfExponent * 1000).rounded())
        let s = Double(smilli) / 1000
        let warm = warmupAccesses ?? accesses / 4

        // The backing store: W stamped pages.
        let path = directory + "/swiftvisor-balloon-lab-\(getpid())-\(engine.rawValue)-\(UInt32.random(in: 0...UInt32.max)).img"
        var image = [UInt8](repeating: 0, count: datasetPages * Self.pageSize)
        image.withUnsafeMutableBytes { raw in
            for i in 0..<datasetPages {
                raw.storeBytes(of: UInt64(i).littleEndian, toByteOffset: i * Self.pageSize, as: UInt64.self)
                raw.storeBytes(of: (UInt64(i) ^ Self.stampMagic).littleEndian, toByteOffset: i * Self.pageSize + Self.pageSize - 8, as: UInt64.self)
            }
        }
        ProcessLifecycle.register(path: path)  // removed if a signal ends the lab
        defer { unlink(path); ProcessLifecycle.unregister(path: path) }
        guard FileManager.default.createFile(atPath: path, contents: Data(image)) else {
            throw LabError.badParameters("cannot create the disk image \(path)")
        }

        let out = GuestOutput()
        var config = MachineConfiguration(
            memorySize: ramBytes,
            commandLine: "pages=\(datasetPages) accesses=\(accesses) warm=\(warm) smilli=\(smilli) seed=\(seed)",
            timeoutSeconds: 1200)
        config.recordExits = false
        config.guestName = "zipf-cache"
        let m = try Machine(image: try GuestProgram.load("zipf-cache"), configuration: config,
                            engine: try EngineSelection.make(engine), serialOutput: out.append)
        try m.addVirtioBlock(path: path)
        let lab = self
        let controller = Controller(memory: m.memory, progress: progress, schedule: { lab.targets(poolPages: $0) })
        controller.balloon = try m.addVirtioBalloon(target: 0)
        try m.attach(controller, firstPort: MarkerPort.port, count: 1)
        let r = try m.run()
        progress.finish()
        let text = out.text
        guard r.stopReason == .exitPort(status: 0) else { throw LabError.guestFailed(what: "zipf-cache guest", reason: r.stopReason.summary, output: text) }
        guard let poolPages = controller.poolPages, let ready = controller.ready else {
            throw LabError.guestFailed(what: "zipf-cache guest", reason: "no ready mark", output: text)
        }

        let lines = text.split(separator: "\n").map(String.init)
        let phaseLines = lines.filter { $0.hasPrefix("phase ") }.map(Self.fields)
        let marks = controller.marks, targets = controller.targets
        guard phaseLines.count == marks.count, phaseLines.count == targets.count else {
            throw LabError.guestFailed(what: "zipf-cache guest", reason: "\(phaseLines.count) phase lines, \(marks.count) marks, \(targets.count) targets", output: text)
        }
        let model = ZipfModel(pages: datasetPages, exponent: s)
        var replay = ZipfCacheReplay(pages: datasetPages, smilli: UInt64(smilli), seed: seed)
        let frames = UInt32(phaseLines.first?["cache"] ?? 0)
        let replayed = replay.run(frames: Int(frames), cacheSizes: phaseLines.map { Int($0["cache"] ?? 0) }, warmup: warm, accesses: accesses)
        var phases: [Phase] = []
        var previousTarget: UInt32 = 0
        var previousNs = ready.nanoseconds
        var bad: UInt64 = 0
        for (i, f) in phaseLines.enumerated() {
            let cache = UInt32(f["cache"] ?? 0), a = f["accesses"] ?? 0, miss = f["misses"] ?? 0
            bad += f["bad"] ?? 0
            let lru = model.lruMissRate(cache: Int(cache)), top = model.topCMissRate(cache: Int(cache))
            let target = targets[i]
            phases.append(Phase(
                phase: i, step: i == 0 ? "no balloon" : (target > previousTarget ? "inflate" : "deflate"),
                targetPages: target, balloonPages: UInt32(f["balloon"] ?? 0), cachePages: cache,
                residentPages: UInt32(f["resident"] ?? 0), accesses: a, misses: miss,
                missRate: a > 0 ? Double(miss) / Double(a) : 0,
                replayedClockMisses: replayed[i].clock, simulatedLRUMisses: replayed[i].lru,
                simulatedMissRateLRU: Double(replayed[i].lru) / Double(accesses), predictedMissRateLRU: lru, predictedMissRateTopC: top,
                samplingError2Sigma: a > 0 ? 2 * (lru * (1 - lru) / Double(a)).squareRoot() : 0,
                evictedForBalloon: f["evicted"] ?? 0, hostAllocatedBytes: marks[i].allocated,
                returnedBytes: marks[i].stats.returnedBytes, discardedBytes: marks[i].stats.discardedBytes,
                seconds: Double(marks[i].nanoseconds - previousNs) / 1e9))
            previousTarget = target
            previousNs = marks[i].nanoseconds
        }
        let banner = lines.first { $0.hasPrefix("zipf-cache: ") && $0.contains(" ppm") } ?? ""
        let ppm = banner.split(separator: ",").compactMap { part -> Int? in
            let t = part.trimmed
            guard t.hasPrefix("top page "), t.hasSuffix(" ppm") else { return nil }
            return Int(t.dropFirst("top page ".count).dropLast(" ppm".count))
        }.first ?? 0
        let cpl = banner.contains("cpl3") ? 3 : 0
        return Result(engine: engine.rawValue, cpl: cpl, drivers: "virtio-blk and virtio-balloon, polling", datasetPages: datasetPages,
                      zipfExponent: s, accessesPerPhase: accesses, warmupAccessesPerPhase: warm, ramBytes: ramBytes,
                      cacheFrames: frames, poolPages: poolPages, hostAllocatedBytesAtStart: ready.allocated, guestTopPagePpm: ppm,
                      modelTopPagePpm: 1e6 / model.harmonic(datasetPages), badStamps: bad,
                      replayMatchesGuest: zip(phases, replayed).allSatisfy { $0.misses == $1.clock }, phases: phases, guestOutput: text)
    }

    /// `key=value` fields of a guest line.
    static func fields(_ line: String) -> [String: UInt64] {
        var d: [String: UInt64] = [:]
        for part in line.split(separator: " ") {
            let kv = part.split(separator: "=", maxSplits: 1)
            if kv.count == 2, let v = UInt64(kv[1]) { d[String(kv[0])] = v }
        }
        return d
    }

    static func mib(_ b: UInt64) -> String { (Double(b) / 1_048_576).fixed(1) }

    static func pct(_ x: Double) -> String { "\((100 * x).fixed(2))%" }

    package static func table(_ r: Result) -> LabTable {
        let w = Double(r.datasetPages)
        let rows = r.phases.map { p in
            [String(p.phase), p.step, String(p.balloonPages), "\(p.cachePages) (\((100 * Double(p.cachePages) / w).fixed(0))%)",
             String(p.misses), pct(p.missRate), pct(p.simulatedMissRateLRU), pct(p.predictedMissRateLRU), pct(p.predictedMissRateTopC),
             String(p.evictedForBalloon), mib(p.hostAllocatedBytes), mib(p.returnedBytes), p.seconds.fixed(2)]
        }
        var notes: [String] = []
        notes.append("workload: \(r.datasetPages) pages (\(mib(UInt64(r.datasetPages) * 4096)) MiB) on a virtio-blk disk, Zipf(s=\(r.zipfExponent.significant(3))) page ids, "
            + "\(r.accessesPerPhase) counted accesses per phase after \(r.warmupAccessesPerPhase) uncounted ones; a CLOCK cache whose frames are the balloon driver's page pool "
            + "(\(r.cacheFrames) frames to start, \(r.poolPages - r.cacheFrames) pool pages left free, in \(mib(r.ramBytes)) MiB of RAM; warmed with the most popular pages, reference bits clear). Guest at CPL\(r.cpl), \(r.drivers).")
        notes.append("references: \"LRU sim\" — an exact LRU cache of the same size fed the same access stream on the host; \"Che\" — Che's approximation for LRU under independent references "
            + "(T with Σ(1 − e^(−p_i·T)) = C, miss = Σ p_i·e^(−p_i·T)); \"top-C\" — the cache holds exactly the C most popular pages, miss = 1 − H(C,s)/H(W,s), the best a cache without foresight can do.")
        notes.append(r.replayMatchesGuest
            ? "the host's replay of the guest's CLOCK cache (same fixed-point CDF, generator and evictions) counts exactly the guest's misses in every phase: the measurement is the algorithm, nothing lost or extra."
            : "the host's replay of the guest's CLOCK cache does NOT count the guest's misses exactly: " + r.phases.map { "\($0.misses) vs \($0.replayedClockMisses)" }.joined(separator: ", "))
        let steady = r.phases.filter { $0.step != "deflate" && $0.cachePages < r.datasetPages }
        if let big = steady.max(by: { $0.cachePages < $1.cachePages }), let small = steady.min(by: { $0.cachePages < $1.cachePages }) {
            let dChe = steady.map { abs($0.missRate - $0.predictedMissRateLRU) }
            let dSim = steady.map { $0.missRate - $0.simulatedMissRateLRU }
            let cheErr = steady.map { abs($0.simulatedMissRateLRU - $0.predictedMissRateLRU) }
            notes.append("agreement while the balloon grows: measured CLOCK is within \((100 * dChe.max()!).fixed(2)) points of Che (mean \((100 * dChe.reduce(0, +) / Double(dChe.count)).fixed(2))); CLOCK minus the LRU simulation is \((100 * dSim.min()!).fixed(2, sign: true))…\((100 * dSim.max()!).fixed(2, sign: true)) points "
                                + "(CLOCK's one reference bit only approximates recency), and Che's formula is within \((100 * cheErr.max()!).fixed(2)) points of the LRU simulation (one sample of the stream: its noise included). Sampling alone moves a phase by up to ±\((100 * steady.map(\.samplingError2Sigma).max()!).fixed(2)) points (2σ).")
            notes.append("top-C is the floor: the measured rate is \((100 * (big.missRate - big.predictedMissRateTopC)).fixed(2)) points above it with a \(big.cachePages)-page cache and \((100 * (small.missRate - small.predictedMissRateTopC)).fixed(2)) with \(small.cachePages) pages — recency is a noisy proxy for popularity, so LRU and CLOCK keep recently touched unpopular pages in frames the top-C cache gives to popular ones.")
        }
        if let deepest = r.phases.max(by: { $0.balloonPages < $1.balloonPages }) {
            let evicted = r.phases.reduce(0) { $0 + $1.evictedForBalloon }
            let unfilled = Int(r.poolPages) - min(Int(r.cacheFrames), r.datasetPages)
            notes.append("host memory: \(mib(r.hostAllocatedBytesAtStart)) MiB once the cache was warm, \(mib(deepest.hostAllocatedBytes)) MiB with \(deepest.balloonPages) pages (\(mib(UInt64(deepest.balloonPages) * 4096)) MiB) in the balloon; "
                + "the device counted \(mib(deepest.returnedBytes)) MiB given back by its discards. The host only ever backed frames that held pages: the \(unfilled) free pool pages and frames the cache never filled went to the balloon first and gave nothing back, "
                + "then \(evicted) cache pages were evicted to hand over their frames (\(mib(evicted * 4096)) MiB — what came back).")
        }
        if let last = r.phases.last, last.step == "deflate", r.phases.count >= 2 {
            let before = r.phases[r.phases.count - 2]
            notes.append("deflate: the cache gets its frames back empty (they read as zeros: the host discarded them), so \(pct(last.missRate)) in this phase is refill — misses for pages the small cache had dropped — "
                + "above the steady-state models; host memory grows back (\(mib(before.hostAllocatedBytes)) → \(mib(last.hostAllocatedBytes)) MiB) only as misses fill the frames again.")
        }
        notes.append("phase s: wall time since the previous phase ended — the balloon adjustment, the warm-up and the counted accesses; it grows with the misses, each a polled virtio-blk read of 4 KiB (a queue notify to the VMM, then the guest spins on the used ring).")
        notes.append("no floating point in guests: the guest builds the Zipf CDF in fixed point; its top page has \(r.guestTopPagePpm) ppm, 1/H(W,s) = \(r.modelTopPagePpm.fixed(0)) ppm. Every access checks the page's stamp in its frame: \(r.badStamps) bad (a frame ballooned while still cached would read zeros).")
        return LabTable(
            title: "S7 balloon vs page cache: Zipf miss rate as the balloon grows (\(r.engine) engine, guest at CPL\(r.cpl))",
            columns: ["phase", "step", "balloon pages", "cache pages (of W)", "misses", "miss rate", "LRU sim", "Che (LRU)", "top-C",
                      "evicted for balloon", "host MiB", "returned MiB", "phase s"],
            rows: rows, notes: notes)
    }

    /// Miss rate against balloon size, measured beside the LRU simulation and the two models;
    /// a phase after deflating (a cold cache refilling) is shown apart.
    package static func chart(_ r: Result) -> LineChart {
        let growing = r.phases.filter { $0.step != "deflate" }
        func curve(_ value: (Phase) -> Double) -> [(x: Double, y: Double)] { growing.map { (x: Double($0.balloonPages), y: 100 * value($0)) } }
        var series: [LineChart.Series] = [
            .init(name: "measured miss rate", points: curve(\.missRate)),
            .init(name: "exact LRU simulation of the same accesses", points: curve(\.simulatedMissRateLRU)),
            .init(name: "model: Che's approximation (LRU)", points: curve(\.predictedMissRateLRU), isModel: true),
            .init(name: "model: top-C, 1 − H(C,s)/H(W,s)", points: curve(\.predictedMissRateTopC), isModel: true),
        ]
        let deflated = r.phases.filter { $0.step == "deflate" }
        if !deflated.isEmpty {
            series.append(.init(name: "measured after deflating (cache refilling)", points: deflated.map { (x: Double($0.balloonPages), y: 100 * $0.missRate) }))
        }
        return LineChart(title: "S7 on the \(r.engine) engine: page-cache miss rate vs balloon size (Zipf s = \(r.zipfExponent.fixed(2)))",
                         xLabel: "balloon size (pages of 4 KiB)", yLabel: "miss rate (%)", series: series)
    }
}

/// Independent-reference model of a cache of C pages under Zipf(s) over W pages.
package struct ZipfModel: Sendable {
    package let pages: Int
    package let exponent: Double
    /// p_k for k = 1…W.
    package let probabilities: [Double]

    package init(pages: Int, exponent: Double) {
        self.pages = pages
        self.exponent = exponent
        let weights = (1...max(pages, 1)).map { pow(Double($0), -exponent) }
        let h = weights.reduce(0, +)
        probabilities = weights.map { $0 / h }
    }

    /// H(n, s) = Σ_{k=1…n} k^−s.
    package func harmonic(_ n: Int) -> Double {
        guard n > 0 else { return 0 }
        return (1...n).reduce(0.0) { $0 + pow(Double($1), -exponent) }
    }

    /// The cache holds the C most popular pages: miss = 1 − H(C,s)/H(W,s).
    package func topCMissRate(cache: Int) -> Double {
        if cache >= pages { return 0 }
        if cache <= 0 { return 1 }
        return max(0, 1 - harmonic(cache) / harmonic(pages))
    }

    /// Che's approximation for LRU: T with Σ(1 − e^(−p_i T)) = C; miss = Σ p_i e^(−p_i T).
    package func lruMissRate(cache: Int) -> Double {
        if cache >= pages { return 0 }
        if cache <= 0 { return 1 }
        let c = Double(cache)
        func occupancy(_ t: Double) -> Double { probabilities.reduce(0) { $0 + (1 - exp(-$1 * t)) } }
        var lo = 0.0, hi = 1.0
        while occupancy(hi) < c { hi *= 2 }
        for _ in 0..<80 {
            let mid = (lo + hi) / 2
            if occupancy(mid) < c { lo = mid } else { hi = mid }
        }
        let t = (lo + hi) / 2
        return probabilities.reduce(0) { $0 + $1 * exp(-$1 * t) }
    }
}

/// The `zipf-cache` guest's workload replayed on the host: the same fixed-point Zipf CDF,
/// splitmix64 stream and CLOCK cache (its frames taken and given back as the guest
/// reported them), and beside it an exact LRU cache of the same size fed the same stream.
/// The CLOCK replay must count the guest's misses exactly; the LRU one separates "CLOCK is
/// not LRU" from "Che's formula is an approximation".
package struct ZipfCacheReplay: Sendable {
    /// 2^(-2^-i) for i = 1…32 in Q0.64 (the guest's table).
    static let pow2NegFrac: [UInt64] = [
        0xb504f333f9de6484, 0xd744fccad69d6af4, 0xeac0c6e7dd24392f, 0xf5257d152486cc2c,
        0xfa83b2db722a033a, 0xfd3e0c0cf486c175, 0xfe9e115c7b8f884c, 0xff4ecb59511ec8a5,
        0xffa756521c8daed2, 0xffd3a751c0f7e10c, 0xffe9d2b2f7db2756, 0xfff4e91bff1b8c3e,
        0xfffa747ea0040664, 0xfffd3a3b7814eb54, 0xfffe9d1cc60ddab1, 0xffff4e8e25879bfa,
        0xffffa7470363f451, 0xffffd3a37dda0313, 0xffffe9d1bdf703af, 0xfffff4e8debe025e,
        0xfffffa746f4fa150, 0xfffffd3a37a3f8b0, 0xfffffe9d1bd1065a, 0xffffff4e8de845ae,
        0xffffffa746f41377, 0xffffffd3a37a05e4, 0xffffffe9d1bd01fc, 0xfffffff4e8de80c0,
        0xfffffffa746f4051, 0xfffffffd3a37a025, 0xfffffffe9d1bd011, 0xffffffff4e8de808,
    ]

    /// log2(k) in Q32.32 by repeated squaring, as the guest computes it.
    static func log2Q32(_ k: UInt64) -> UInt64 {
        let n = UInt64(63 - k.leadingZeroBitCount)
        var m = n >= 62 ? k >> (n - 62) : k << (62 - n)
        var r = n << 32
        for i in stride(from: 31, through: 0, by: -1) {
            let p = m.multipliedFullWidth(by: m)
            m = (p.high << 2) | (p.low >> 62)
            if m >= 1 << 63 { m >>= 1; r |= 1 << UInt64(i) }
        }
        return r
    }

    /// 2^-e (e in Q32.32) in Q16.48, at least 1.
    static func pow2NegQ48(_ e: UInt64) -> UInt64 {
        let n = e >> 32, f = UInt32(truncatingIfNeeded: e)
        if n >= 48 { return 1 }
        var v = UInt64.max
        for i in 0..<32 where f & (1 << UInt32(31 - i)) != 0 { v = v.multipliedFullWidth(by: pow2NegFrac[i]).high }
        let w = (v >> 16) >> n
        return w == 0 ? 1 : w
    }

    /// The guest's CDF: cdf[k] = Σ_{j ≤ k} weight(j + 1).
    package static func cdf(pages: Int, smilli: UInt64) -> [UInt64] {
        var total: UInt64 = 0
        return (0..<pages).map { k in
            total &+= pow2NegQ48(log2Q32(UInt64(k + 1)) &* smilli / 1000)
            return total
        }
    }

    let cdf: [UInt64]
    var rng: UInt64
    let pages: Int
    // CLOCK, as the guest keeps it: frames [0, resident) full, the rest empty.
    var whereClock: [Int32]
    var framePage: [Int32] = []
    var frameRef: [UInt8] = []
    var resident = 0, hand = 0
    // LRU: a doubly linked list over pages, most recent at `head`.
    var prev: [Int32], next: [Int32], inLRU: [Bool]
    var head: Int32 = -1, tail: Int32 = -1, lruCount = 0, lruCapacity = 0

    package init(pages: Int, smilli: UInt64, seed: UInt64) {
        self.pages = pages
        cdf = Self.cdf(pages: pages, smilli: smilli)
        rng = seed
        whereClock = [Int32](repeating: -1, count: pages)
        prev = [Int32](repeating: -1, count: pages)
        next = [Int32](repeating: -1, count: pages)
        inLRU = [Bool](repeating: false, count: pages)
    }

    /// Probability of the most popular page in the guest's CDF, in ppm (as the guest prints it).
    package var topPagePpm: UInt64 { (cdf[0] >> 16) * 1_000_000 / (cdf[pages - 1] >> 16) }

    mutating func next64() -> UInt64 {
        rng &+= 0x9E37_79B9_7F4A_7C15
        var z = rng
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }

    mutating func draw() -> Int {
        let u = next64().multipliedFullWidth(by: cdf[pages - 1]).high
        var lo = 0, hi = pages - 1
        while lo < hi {
            let mid = (lo + hi) / 2
            if cdf[mid] > u { hi = mid } else { lo = mid + 1 }
        }
        return lo
    }

    // MARK: CLOCK

    var frameCount: Int { framePage.count }

    mutating func clockVictim() -> Int {
        while true {
            let f = hand
            hand = hand + 1 >= frameCount ? 0 : hand + 1
            if frameRef[f] == 0 { return f }
            frameRef[f] = 0
        }
    }

    mutating func clockAccess(_ page: Int) -> Bool {
        let f = whereClock[page]
        if f >= 0 { frameRef[Int(f)] = 1; return false }
        let v: Int
        if resident < frameCount {
            v = resident; resident += 1
        } else {
            v = clockVictim()
            whereClock[Int(framePage[v])] = -1
        }
        framePage[v] = Int32(page); frameRef[v] = 1; whereClock[page] = Int32(v)
        return true
    }

    mutating func giveFrames(_ count: Int) {
        var n = count
        while n > 0, frameCount > 1 {
            n -= 1
            let last = frameCount - 1
            if resident >= frameCount {
                let v = clockVictim()
                whereClock[Int(framePage[v])] = -1
                framePage[v] = framePage[last]; frameRef[v] = frameRef[last]
                if v != last { whereClock[Int(framePage[v])] = Int32(v) }
                resident -= 1
            }
            framePage.removeLast(); frameRef.removeLast()
            if hand >= frameCount { hand = 0 }
        }
    }

    mutating func setClockFrames(_ frames: Int) {
        if frames < frameCount { giveFrames(frameCount - frames) }
        while frameCount < frames { framePage.append(-1); frameRef.append(0) }
    }

    // MARK: LRU

    mutating func unlink(_ p: Int32) {
        let a = prev[Int(p)], b = next[Int(p)]
        if a >= 0 { next[Int(a)] = b } else { head = b }
        if b >= 0 { prev[Int(b)] = a } else { tail = a }
    }

    mutating func pushFront(_ p: Int32) {
        prev[Int(p)] = -1; next[Int(p)] = head
        if head >= 0 { prev[Int(head)] = p } else { tail = p }
        head = p
    }

    mutating func evictLRU() {
        let t = tail
        unlink(t); inLRU[Int(t)] = false; lruCount -= 1
    }

    mutating func lruAccess(_ page: Int) -> Bool {
        let p = Int32(page)
        if inLRU[page] { unlink(p); pushFront(p); return false }
        pushFront(p); inLRU[page] = true; lruCount += 1
        while lruCount > lruCapacity { evictLRU() }
        return true
    }

    mutating func setLRUCapacity(_ c: Int) {
        lruCapacity = max(c, 1)
        while lruCount > lruCapacity { evictLRU() }
    }

    /// Misses per phase (CLOCK, LRU), for a guest that started with `frames` frames and had
    /// `cacheSizes[i]` frames in phase i.
    package mutating func run(frames: Int, cacheSizes: [Int], warmup: UInt64, accesses: UInt64) -> [(clock: UInt64, lru: UInt64)] {
        setClockFrames(frames)
        setLRUCapacity(frames)
        while resident < frameCount, resident < pages {  // the guest's warm start
            let f = resident
            resident += 1
            framePage[f] = Int32(f); frameRef[f] = 0; whereClock[f] = Int32(f)
            _ = lruAccess(f)
        }
        var out: [(UInt64, UInt64)] = []
        for c in cacheSizes {
            setClockFrames(c)
            setLRUCapacity(c)
            var clock: UInt64 = 0, lru: UInt64 = 0
            for i in 0..<(warmup + accesses) {
                let page = draw()
                let m1 = clockAccess(page), m2 = lruAccess(page)
                if i >= warmup {
                    if m1 { clock += 1 }
                    if m2 { lru += 1 }
                }
            }
            out.append((clock, lru))
        }
        return out
    }
}
