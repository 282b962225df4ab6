import Foundation
import TestSupport
import Testing
@testable import Lab
import VMM
#if canImport(Glibc)
import Glibc
#endif

/// S7 at a reduced size: as the balloon grows the guest's cache shrinks, its miss rate rises
/// the way the Zipf models say, and the host holds less memory.
@Suite struct BalloonLabTests {
    static func smallLab(_ engine: EngineChoice) -> BalloonLab {
        var lab = BalloonLab(engine: engine)
        lab.datasetPages = 512
        lab.accesses = 20_000
        lab.cacheFractions = [0.5, 0.25, 0.1]
        return lab
    }

    @Test(arguments: TestEngines.available)
    func missRateRisesAsPredictedAndTheHostGetsMemoryBack(engine: EngineChoice) throws {
        let r = try Self.smallLab(engine).run()
        #expect(r.cpl == 3)
        #expect(r.badStamps == 0, "\(r.guestOutput)")
        #expect(r.replayMatchesGuest, "\(r.phases.map { ($0.misses, $0.replayedClockMisses) })")
        #expect(r.guestOutput.hasSuffix("zipf-cache: done, 0 pages in the balloon, 0 bad stamps\n"), "\(r.guestOutput)")
        #expect(abs(Double(r.guestTopPagePpm) - r.modelTopPagePpm) <= 1)

        // no balloon, three inflations, the final deflation
        try #require(r.phases.count == 5, "\(r.guestOutput)")
        let steps = r.phases.map(\.step)
        #expect(steps == ["no balloon", "inflate", "inflate", "inflate", "deflate"])
        let growing = Array(r.phases.prefix(4))
        #expect(growing[0].misses == 0)  // the warm cache holds every page
        #expect(growing[0].cachePages >= 512)
        for (a, b) in zip(growing, growing.dropFirst()) {
            #expect(b.balloonPages > a.balloonPages)
            #expect(b.cachePages < a.cachePages)
            #expect(b.missRate >= a.missRate - 0.005, "miss rate fell from \(a.missRate) to \(b.missRate)")
            #expect(b.hostAllocatedBytes < a.hostAllocatedBytes, "host memory \(a.hostAllocatedBytes) → \(b.hostAllocatedBytes)")
        }
        for p in growing {
            #expect(p.balloonPages == p.targetPages)
            #expect(p.accesses == 20_000)
            // Che's LRU approximation within a band of the measured CLOCK cache; top-C a floor.
            #expect(abs(p.missRate - p.predictedMissRateLRU) <= 0.02 + 0.1 * p.predictedMissRateLRU,
                    "phase \(p.phase): measured \(p.missRate), Che \(p.predictedMissRateLRU)")
            #expect(p.missRate >= p.predictedMissRateTopC - p.samplingError2Sigma)
            #expect(p.predictedMissRateTopC <= p.predictedMissRateLRU)
        }
        #expect(growing[3].missRate > 0.2)  // 10 % of the pages cached

        // What came back is the cache pages evicted for the balloon (frames never filled
        // were never backed), and the host's allocation fell by about as much.
        let evicted = r.phases.reduce(0) { $0 + $1.evictedForBalloon }
        #expect(evicted > 0)
        let deepest = growing[3]
        #expect(deepest.returnedBytes >= evicted * 4096 * 9 / 10 && deepest.returnedBytes <= evicted * 4096 + (1 << 20),
                "returned \(deepest.returnedBytes) for \(evicted) evicted pages")
        let drop = r.hostAllocatedBytesAtStart - deepest.hostAllocatedBytes
        #expect(drop >= evicted * 4096 * 9 / 10, "allocated fell by \(drop) for \(evicted) evicted pages")

        // Deflated: the frames come back empty and fill again as the guest misses.
        let last = r.phases[4]
        #expect(last.balloonPages == 0)
        #expect(last.cachePages == growing[0].cachePages)
        #expect(last.hostAllocatedBytes > deepest.hostAllocatedBytes)

        let table = BalloonLab.table(r)
        #expect(table.rows.count == 5)
        #expect(table.title.contains("CPL3"))
        // The chart: miss rate (one unit) against balloon size; four growing phases on the
        // curves, the deflated one apart.
        let chart = BalloonLab.chart(r)
        #expect(chart.yLabel == "miss rate (%)")
        #expect(chart.series.map(\.points.count) == [4, 4, 4, 4, 1])
        #expect(chart.series[0].points.map(\.x) == growing.map { Double($0.balloonPages) })
        #expect(chart.svg.contains("<polyline") && !chart.svg.contains("MiB"))
    }

    @Test func zipfModelsAgreeWithTheirDefinitions() {
        let m = ZipfModel(pages: 1000, exponent: 1)
        let h = (1...1000).reduce(0.0) { $0 + 1 / Double($1) }
        #expect(abs(m.harmonic(1000) - h) < 1e-9)
        #expect(abs(m.topCMissRate(cache: 100) - (1 - m.harmonic(100) / h)) < 1e-12)
        #expect(m.topCMissRate(cache: 1000) == 0 && m.lruMissRate(cache: 2000) == 0)
        #expect(m.topCMissRate(cache: 0) == 1 && m.lruMissRate(cache: 0) == 1)
        var previous = 0.0
        for c in [900, 500, 250, 100, 10] {
            let lru = m.lruMissRate(cache: c)
            #expect(lru > m.topCMissRate(cache: c))  // LRU wastes frames on unpopular pages
            #expect(lru > previous)
            previous = lru
        }
    }

    @Test func guestFixedPointCDFMatchesZipf() {
        for smilli: UInt64 in [500, 1000, 1500, 2500] {
            let s = Double(smilli) / 1000
            let cdf = ZipfCacheReplay.cdf(pages: 4096, smilli: smilli)
            let weights = (1...4096).map { pow(Double($0), -s) }
            let total = weights.reduce(0, +)
            var sum = 0.0
            for (k, w) in weights.enumerated() {
                sum += w
                if k % 97 == 0 || k == 4095 {
                    let fixed = Double(cdf[k]) / Double(cdf[4095])
                    #expect(abs(fixed - sum / total) < 1e-6, "s=\(s) k=\(k)")
                }
            }
        }
    }

    @Test func scheduleShrinksTheCacheThenDeflatesWithoutRepeats() {
        var lab = BalloonLab(engine: .software)
        lab.datasetPages = 1000
        lab.cacheFractions = [1.0, 0.5, 0.5, 0.001]
        #expect(lab.targets(poolPages: 1200) == [0, 200, 700, 1199, 0])
        lab.deflateAtEnd = false
        lab.cacheFractions = [1.0]
        #expect(lab.targets(poolPages: 900) == [0])  // a cache smaller than W: nothing to take
    }
}
