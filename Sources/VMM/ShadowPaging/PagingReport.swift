import Dispatch
import FoundationEssentials
#if canImport(Glibc)
import Glibc
#endif
import VirtCore

/// How a machine's guest addresses were translated (scenario S5 accounting): the mode,
/// the engine's TLB and walk counters, and in shadow mode the pager's exits.
public struct PagingReport: Sendable, Codable, Equatable {
    public var mode: PagingMode
    /// The second level's largest page (nested walks read fewer of its levels with large pages).
    public var secondLevelPage: SecondLevelPageSize?
    public var counts: PageWalkCounts
    public var shadow: ShadowPagingStatistics?

    public init(mode: PagingMode, secondLevelPage: SecondLevelPageSize?, counts: PageWalkCounts, shadow: ShadowPagingStatistics?) {
        self.mode = mode; self.secondLevelPage = secondLevelPage; self.counts = counts; self.shadow = shadow
    }

    public var text: String {
        var s = "paging: \(mode)"
        if mode == .nested, let p = secondLevelPage { s += " (second level in \(p) pages)" }
        s += ", \(counts.walks) page walks, \(counts.referencesPerWalk.fixed(1)) references per walk"
        if let h = counts.tlbHitRate { s += ", TLB hit rate \((h * 100).fixed(4)) % of \(counts.tlbLookups) lookups" }
        if let sh = shadow {
            func c(_ name: String, _ e: ExitCounter) -> String {
                "\(name) \(e.count)" + (e.count > 0 ? " (\((Double(e.nanoseconds) / Double(e.count) / 1000).fixed(1)) µs avg)" : "")
            }
            s += "\nshadow exits: " + [c("pte-write", sh.pageTableWrites), c("cr3-load", sh.contextSwitches), c("invlpg", sh.invalidations),
                                       c("fill", sh.fills), c("guest #PF", sh.guestPageFaults)].joined(separator: ", ")
            s += "; VMM time \((Double(sh.nanoseconds) / 1e6).fixed(3)) ms"
            s += "\nshadow pages: \(sh.shadowPagesCreated) made, \(sh.shadowPagesZapped) emptied, \(sh.shadowPagesUnshadowed) unshadowed, \(sh.fullResets) full resets"
        }
        return s
    }
}

extension Machine {
    /// nil when the engine keeps no page-walk counters (KVM).
    public var pagingReport: PagingReport? {
        let counters = allVCPUs.compactMap { ($0 as? any PageWalkCounting)?.pageWalkCounts }
        guard counters.count == allVCPUs.count else { return nil }
        return PagingReport(mode: configuration.paging,
                            secondLevelPage: (vm as? any SecondLevelPageSizing)?.secondLevelLargestPage,
                            counts: counters.reduce(PageWalkCounts(), +), shadow: shadowPager?.statistics)
    }
}
