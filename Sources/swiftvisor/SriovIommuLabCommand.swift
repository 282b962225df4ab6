import ArgumentParser
import Dispatch
import FoundationEssentials
#if canImport(Glibc)
import Glibc
#endif
import Lab

struct SriovIommu: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "sriov-iommu",
        abstract: "S4: an SR-IOV VF's DMA through an IOMMU: throughput vs I/O page size and IOTLB size, and isolation.",
        discussion: """
            Throughput: the VF's DMA engine fills receive buffers in a VM's RAM through the \
            IOMMU model (its page tables and IOTLB), for 4 KiB and 2 MiB I/O pages and several \
            IOTLB sizes. The IOMMU's budget (translations per second, cost of an IOTLB miss) and \
            the link give the throughput, shown beside the model min(link, translations/s × \
            bytes per translation). Two guests then exchange frames through their VFs, every \
            DMA translated (the real device path). Isolation: the 'sriov-vf' guest programs its \
            VF to DMA into and out of another VM's memory and the VMM's, with the IOMMU on \
            (blocked, logged) and off (lands).
            """)

    @OptionGroup var options: LabOptions

    @Option(name: .long, help: "Link speed in Gb/s.")
    var linkGbps = 100.0

    @Option(name: .long, help: "IOMMU translations per second (millions).")
    var translationsMillions = 50.0

    @Option(name: .long, help: "Extra cost of an IOTLB miss (page walk), in ns.")
    var missNs = 1000.0

    @Option(name: .customLong("transfer-kib"), help: "Bytes per DMA transfer (KiB).")
    var transferKiB = 64

    @Option(name: .customLong("pool-mib"), help: "Size of the receive-buffer pool (MiB).")
    var poolMiB = 4

    @Option(name: .long, parsing: .upToNextOption, help: "IOTLB sizes (entries).")
    var iotlb: [Int] = [64, 512, 2048]

    @Option(name: .long, help: "Round trips of the two-VM frame exchange through the VFs (0: skip it).")
    var roundTrips = 200

    @Option(name: .long, help: "IOTLB replacement: lru, fifo or random.")
    var replacement = "lru"

    func validate() throws {
        guard linkGbps > 0, translationsMillions > 0, missNs >= 0 else { throw ValidationError("link, translations and miss cost must be positive") }
        guard transferKiB > 0, poolMiB > 0, poolMiB << 10 >= transferKiB else { throw ValidationError("need 0 < --transfer-kib ≤ --pool-mib × 1024") }
        guard !iotlb.isEmpty, iotlb.allSatisfy({ $0 > 0 && $0 <= 1 << 16 }) else { throw ValidationError("IOTLB sizes must be 1–65536") }
        guard roundTrips >= 0, roundTrips <= 100_000 else { throw ValidationError("--round-trips: 0–100000") }
        guard ["lru", "fifo", "random"].contains(replacement) else { throw ValidationError("--replacement: lru, fifo or random") }
    }

    func run() throws {
        var lab = SriovIommuLab(engine: options.resolvedEngine())
        lab.linkBytesPerSecond = linkGbps * 1e9 / 8
        try lab.setIOMMU(translationsPerSecond: translationsMillions * 1e6, missNanoseconds: missNs, replacement: replacement)
        lab.transferBytes = transferKiB << 10
        lab.poolBytes = poolMiB << 20
        lab.iotlbSizes = iotlb
        lab.roundTrips = roundTrips
        printError("lab sriov-iommu: \(lab.engine.rawValue) engine for the isolation runs…")
        let result = try lab.run(progress: .onTerminal("lab sriov-iommu", report: options.report))
        try options.emit(result, name: "sriov-iommu", table: SriovIommuLab.table(result), chart: SriovIommuLab.chart(result))
    }
}
