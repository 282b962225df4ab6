import Testing
@testable import Lab
import VMM

/// S4 at a reduced size: 2 MiB pages beat 4 KiB pages once the pool outgrows the IOTLB's
/// reach, measured matches the model, and the attack is blocked only with the IOMMU on.
@Suite struct SriovIommuLabTests {
    @Test func largePagesLiftTheIOMMUBoundAndTheIOMMUBlocksTheAttack() throws {
        var lab = SriovIommuLab(engine: .software)
        lab.transfers = 256
        lab.iotlbSizes = [64, 2048]
        lab.roundTrips = 50
        let r = try lab.run()
        let small = try #require(r.throughput.first { $0.page == "4K" && $0.iotlbEntries == 64 })
        let reach = try #require(r.throughput.first { $0.page == "4K" && $0.iotlbEntries == 2048 })
        let large = try #require(r.throughput.first { $0.page == "2M" && $0.iotlbEntries == 64 })
        #expect(small.bound == "IOMMU" && small.missRate > 0.99)
        #expect(reach.missRate == 0 && large.missRate == 0)
        #expect(large.measuredGbps > 2 * small.measuredGbps)
        #expect(large.bytesPerTranslation == 65536 && small.bytesPerTranslation == 4096)
        for p in r.throughput { #expect(abs(p.measuredGbps - p.modelGbps) / p.modelGbps < 0.05) }
        // The real VF path between two guests: every DMA translated, none refused, and the
        // 2 MiB domains miss less than the 4 KiB ones for the same traffic.
        #expect(r.exchange.count == 2)
        for e in r.exchange { #expect(e.faults == 0 && e.translations > 50 * 8) }
        #expect(r.exchange[1].missRate < r.exchange[0].missRate)
        for c in r.isolation {
            if c.iommu {
                #expect(c.receiveInto == "blocked" && c.transmitFrom == "blocked" && c.faultsLogged == 2 && c.victimBytesChanged == 0)
                #expect(c.faultsReported == 2)
            } else {
                #expect(c.receiveInto == "written" && c.transmitFrom == "read" && c.faultsLogged == 0 && c.victimBytesChanged > 0)
            }
        }
        #expect(SriovIommuLab.table(r).text.contains("rx: blocked"))
        #expect(SriovIommuLab.chart(r).svg.hasPrefix("<svg"))
    }
}
