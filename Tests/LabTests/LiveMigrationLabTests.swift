import Foundation
import Testing
@testable import Lab
import VMM
#if canImport(Glibc)
import Glibc
#endif

@Suite struct LiveMigrationLabTests {
    @Test func precopyModelConvergesBelowOneAndHitsTheRoundLimitAbove() {
        // r = 0.5: 4096 → 2048 → … until 4096-byte pages fit 1 ms at 100 MB/s (24 pages).
        let converging = LiveMigrationLab.precopyModel(dirtyPagesPerSecond: 0.5 * 100e6 / 4096, bandwidth: 100e6, firstPass: 4096,
                                                       workingSet: 4096, maxDowntime: 0.001, maxRounds: 30)
        #expect(converging.rounds == 7)
        #expect(converging.downtime <= 0.001)
        let diverging = LiveMigrationLab.precopyModel(dirtyPagesPerSecond: 2 * 100e6 / 4096, bandwidth: 100e6, firstPass: 4096,
                                                      workingSet: 4096, maxDowntime: 0.001, maxRounds: 5)
        #expect(diverging.rounds == 5)
        #expect(abs(diverging.downtime - 4096 * 4096 / 100e6) < 1e-9, "the whole working set goes in the stop-and-copy")
    }

    /// The lab at a reduced size over loopback: an idle guest converges at once, a guest
    /// dirtying its whole area every pass does not and is stopped at the round limit;
    /// post-copy faults on pages still at the source.
    @Test func labRowsShowConvergenceAndItsLimit() throws {
        var lab = LiveMigrationLab(engine: .software)
        lab.memory = 32 << 20
        lab.areaPages = 1024
        lab.spins = [nil, 0]
        lab.linkMegabits = nil
        lab.maxRounds = 3
        // The bandwidth is what the destination consumed (its round acknowledgements), so
        // at any loopback rate here a busy guest's dirty set misses this target while an
        // idle guest's (nothing dirtied, nothing in flight) meets it.
        lab.maxDowntimeMilliseconds = 0.1
        let result = try lab.run()
        #expect(result.rows.count == 2)
        let idle = result.rows[0], busy = result.rows[1]
        #expect(idle.precopy.rounds < lab.maxRounds)
        #expect(busy.dirtyPagesPerSecond > idle.dirtyPagesPerSecond)
        // A busy guest's area does not converge: rounds run to the limit — unless the host
        // starves the guest so that it dirties nothing in a round, which ends pre-copy early
        // with nothing left to send.
        #expect(busy.precopy.rounds == lab.maxRounds || busy.precopy.dirtyPagesPerRound.last == 0)
        #expect(busy.precopy.bytesSent > idle.precopy.bytesSent)
        #expect(busy.postcopy.remoteFaults ?? 0 > 0)
        #expect(LiveMigrationLab.table(result).text.contains("post faults"))
        #expect(LiveMigrationLab.chart(result).svg.hasPrefix("<svg"))
    }

    @Test func enteringAMissingNamespaceIsATypedError() {
        #expect(throws: NetworkNamespaceError.self) { try NetworkNamespace.run(in: "swiftvisor-no-such-namespace") {} }
    }

    /// Two namespaces, a veth pair and tbf: made, used by a real migration across them, removed.
    @Test(.enabled(if: VethLink.unavailableReason == nil, Comment(rawValue: VethLink.unavailableReason ?? "")))
    func migrationCrossesAVethPairBetweenNamespacesWhichAreRemovedAfter() throws {
        var lab = LiveMigrationLab(engine: .software)
        lab.memory = 32 << 20
        lab.areaPages = 256
        lab.spins = [nil]
        lab.linkMegabits = 500
        let link = try VethLink(megabitsPerSecond: 500)
        let names = [link.source, link.destination]
        #expect(names.allSatisfy { access("/var/run/netns/\($0)", F_OK) == 0 })
        link.remove()
        #expect(names.allSatisfy { access("/var/run/netns/\($0)", F_OK) != 0 }, "the namespaces are gone")
        let result = try lab.run()
        #expect(result.network.contains("veth"))
        #expect(result.rows[0].precopy.bytesSent > 0)
        #expect(result.rows[0].postcopy.bytesSent > 0)
    }
}
