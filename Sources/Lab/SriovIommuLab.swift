import Devices
import Dispatch
import FoundationEssentials
#if canImport(Glibc)
import Glibc
#endif
import Synchronization
import VirtCore
import VMM

/// Scenario S4: an SR-IOV VF's DMA behind an IOMMU.
///
/// Throughput: the VF's DMA engine fills `transfers` receive buffers of `transferBytes`
/// spread over `poolBytes` of a VM's RAM, through the IOMMU (real copies, real IOTLB), for
/// each I/O page size and IOTLB size. The IOMMU's budget turns the counted translations
/// and misses into busy time; the link into transfer time; the DMA takes the longer.
/// Beside it, the model: throughput = min(link, translations/s × bytes per translation),
/// with the miss rate predicted from whether the pool's pages fit in the IOTLB.
///
/// Isolation: the `sriov-vf` guest programs its VF to receive into and transmit from
/// another VM's memory and the VMM's, with the IOMMU on and off.
package struct SriovIommuLab: Sendable {
    package var engine: EngineChoice
    package var linkBytesPerSecond: Double = 100e9 / 8
    package var budget = TranslationBudget(translationsPerSecond: 50e6, missNanoseconds: 1000)
    package var transferBytes = 64 << 10
    package var poolBytes = 4 << 20
    package var transfers = 2048
    package var pageSizes: [IOPageSize] = [.size4K, .size2M]
    package var iotlbSizes = [64, 512, 2048]
    package var replacement: IOTLBReplacement = .lru
    /// Round trips of the two-VM frame exchange (0: skip it).
    package var roundTrips = 200

    package init(engine: EngineChoice) { self.engine = engine }

    /// Sets the IOMMU's budget and IOTLB replacement by name (for the CLI).
    package mutating func setIOMMU(translationsPerSecond: Double, missNanoseconds: Double, replacement name: String) throws {
        guard translationsPerSecond > 0, missNanoseconds >= 0 else { throw LabError.badParameters("translations/s must be positive, miss cost non-negative") }
        guard let r = IOTLBReplacement(rawValue: name) else {
            throw LabError.badParameters("IOTLB replacement \(name): one of \(IOTLBReplacement.allCases.map(\.rawValue).joined(separator: ", "))")
        }
        budget = TranslationBudget(translationsPerSecond: translationsPerSecond, missNanoseconds: missNanoseconds)
        replacement = r
    }

    package struct ThroughputPoint: Codable, Sendable {
        package var page: String
        package var iotlbEntries: Int
        package var translations: UInt64
        package var misses: UInt64
        package var missRate: Double
        package var bytesPerTranslation: Double
        /// From the counted translations and misses under the budget, and the link.
        package var measuredGbps: Double
        /// min(link, translations/s × bytes per translation), miss rate predicted.
        package var modelGbps: Double
        package var predictedMissRate: Double
        /// What bounds the transfer: "link" or "IOMMU".
        package var bound: String
        /// How fast this host simulated the translations (not the modelled device).
        package var simulatedTranslationsPerSecond: Double
    }

    package struct IsolationCase: Codable, Sendable {
        package var iommu: Bool
        package var victim: String
        package var receiveInto: String
        package var transmitFrom: String
        package var faultsLogged: Int
        /// Faults the VMM's handler was told of as they happened (the fault event).
        package var faultsReported: Int
        package var victimBytesChanged: Int
        package var faults: [String]
    }

    /// Two VMs exchanging frames through their VFs (the real device path), by I/O page size.
    package struct ExchangePoint: Codable, Sendable {
        package var page: String
        package var iotlbEntries: Int
        package var roundTrips: Int
        package var roundTripsPerSecond: Double
        package var translations: UInt64
        package var missRate: Double
        package var faults: Int
    }

    package struct Result: Codable, Sendable {
        package var engine: String
        package var cpl: Int = 3
        package var linkGbps: Double
        package var budget: TranslationBudget
        package var transferBytes: Int
        package var poolBytes: Int
        package var replacement: String
        package var throughput: [ThroughputPoint]
        package var exchange: [ExchangePoint]
        package var isolation: [IsolationCase]
    }

    /// One step per throughput point, exchange and isolation case reported to `progress`.
    package func run(progress: LabProgress = .silent) throws -> Result {
        guard transferBytes > 0, poolBytes >= transferBytes, transfers > 0, !pageSizes.isEmpty, !iotlbSizes.isEmpty,
              iotlbSizes.allSatisfy({ $0 > 0 }) else {
            throw LabError.badParameters("need transfer > 0, pool ≥ transfer, transfers > 0, IOTLB sizes > 0")
        }
        progress.begin(steps: pageSizes.count * iotlbSizes.count + (roundTrips > 0 ? pageSizes.count : 0) + 4)
        var points: [ThroughputPoint] = []
        for page in pageSizes {
            for entries in iotlbSizes {
                progress.step("throughput, \(page) pages, \(entries)-entry IOTLB")
                points.append(try throughput(page: page, iotlbEntries: entries))
            }
        }
        var exchange: [ExchangePoint] = []
        if roundTrips > 0 {
            for page in pageSizes {
                progress.step("exchange, \(page) pages")
                exchange.append(try self.exchange(page: page, iotlbEntries: iotlbSizes[0]))
            }
        }
        var isolation: [IsolationCase] = []
        for iommu in [true, false] {
            for victim in ["other VM", "VMM"] {
                progress.step("DMA attack on the \(victim), \(iommu ? "with" : "without") the IOMMU")
                isolation.append(try attack(iommu: iommu, victim: victim))
            }
        }
        progress.finish()
        return Result(engine: engine.rawValue, linkGbps: linkBytesPerSecond * 8 / 1e9, budget: budget,
                      transferBytes: transferBytes, poolBytes: poolBytes, replacement: replacement.rawValue,
                      throughput: points, exchange: exchange, isolation: isolation)
    }

    func throughput(page: IOPageSize, iotlbEntries: Int) throws -> ThroughputPoint {
        var config = IOMMUConfiguration()
        config.iotlbEntries = iotlbEntries
        config.replacement = replacement
        config.budget = budget
        let iommu = IOMMU(configuration: config)
        let space = HostPhysicalSpace()
        let ram = UInt64(max(poolBytes, Int(page.bytes)))
        let vm = try GuestMemory(size: (ram + page.bytes - 1) / page.bytes * page.bytes, name: "sriov-lab-vm")
        let base: UInt64 = 4 << 30
        try space.add(vm, at: base, owner: .virtualMachine("lab"))
        let vf = RequesterID(bus: 1, device: 0, function: 1)
        try iommu.createDomain(1)
        try iommu.updateDomain(1) { t throws(IOPageTableError) in
            try t.mapRange(iova: 0, to: base, length: vm.size, page: page, permissions: .readWrite)
        }
        try iommu.attach(vf, to: 1)
        let dma = DeviceDMA(requester: vf, iommu: iommu, space: space)
        let frame = [UInt8](repeating: 0xA5, count: transferBytes)
        let slots = poolBytes / transferBytes
        // Warm-up pass over the pool, then the measured pass: steady state, not cold misses.
        for i in 0..<slots { try dma.write(frame, at: UInt64(i * transferBytes)) }
        iommu.resetCounters()
        let start = monotonicNanoseconds()
        for i in 0..<transfers { try dma.write(frame, at: UInt64((i % slots) * transferBytes)) }
        let wall = Double(monotonicNanoseconds() - start) / 1e9
        let c = iommu.counters
        let bytes = Double(c.bytes)
        let iommuSeconds = budget.busySeconds(translations: c.translations, misses: c.misses)
        let linkSeconds = bytes / linkBytesPerSecond
        let measured = bytes / max(iommuSeconds, linkSeconds)

        // The model, from the configuration alone.
        let perTransfer = (UInt64(transferBytes) + page.bytes - 1) / page.bytes
        let bytesPerTranslation = Double(transferBytes) / Double(perTransfer)
        let poolPages = (UInt64(poolBytes) + page.bytes - 1) / page.bytes
        let predictedMissRate = poolPages <= UInt64(iotlbEntries) ? 0.0 : 1.0
        let secondsPerTranslation = 1 / budget.translationsPerSecond + predictedMissRate * budget.missNanoseconds / 1e9
        let model = min(linkBytesPerSecond, bytesPerTranslation / secondsPerTranslation)
        return ThroughputPoint(page: page.description, iotlbEntries: iotlbEntries, translations: c.translations, misses: c.misses,
                               missRate: c.missRate, bytesPerTranslation: c.translations == 0 ? 0 : bytes / Double(c.translations),
                               measuredGbps: measured * 8 / 1e9, modelGbps: model * 8 / 1e9, predictedMissRate: predictedMissRate,
                               bound: iommuSeconds > linkSeconds ? "IOMMU" : "link",
                               simulatedTranslationsPerSecond: wall > 0 ? Double(c.translations) / wall : 0)
    }

    func exchange(page: IOPageSize, iotlbEntries: Int) throws -> ExchangePoint {
        var config = IOMMUConfiguration()
        config.iotlbEntries = iotlbEntries
        config.replacement = replacement
        let platform = try DeviceAssignmentPlatform(virtualFunctions: 2, iommu: config)
        let guest = try GuestProgram.load("sriov-vf")
        let pingOutput = GuestOutput(), pongOutput = GuestOutput()
        let ping = try Machine(image: guest, configuration: MachineConfiguration(memorySize: 32 << 20, commandLine: "mode=0 peer=1 count=\(roundTrips)", timeoutSeconds: 120),
                               engine: try EngineSelection.make(engine), serialOutput: pingOutput.append)
        let pong = try Machine(image: guest, configuration: MachineConfiguration(memorySize: 32 << 20, commandLine: "mode=1 count=\(roundTrips)", timeoutSeconds: 120),
                               engine: try EngineSelection.make(engine), serialOutput: pongOutput.append)
        try platform.assign(vf: 0, to: ping, name: "a", page: page)
        try platform.assign(vf: 1, to: pong, name: "b", page: page)
        // Both guests spin on their rings; the NIC's engine gets the CPU when it needs it
        // (real-time where permitted), as the device's own hardware would.
        let realtime = PartitionPolicy(fifoPriority: 20)
        platform.start(policy: (try? Partitioning.check(realtime)) != nil ? realtime : PartitionPolicy())
        defer { platform.stop() }
        let pongThread = HostThread(name: "pong-vm") { _ = try? pong.run() }
        let r = try ping.run()
        pong.stop()
        pongThread.join()
        guard r.stopReason == .exitPort(status: 0) else {
            throw LabError.guestFailed(what: "VF exchange (\(page) pages)", reason: r.stopReason.summary, output: pingOutput.text)
        }
        let c = platform.iommu.counters
        let seconds = Double(r.wallNanoseconds) / 1e9
        return ExchangePoint(page: page.description, iotlbEntries: iotlbEntries, roundTrips: roundTrips,
                             roundTripsPerSecond: seconds > 0 ? Double(roundTrips) / seconds : 0,
                             translations: c.translations, missRate: c.missRate, faults: platform.iommu.faultLog.faults.count)
    }

    func attack(iommu: Bool, victim: String) throws -> IsolationCase {
        let platform = try DeviceAssignmentPlatform(virtualFunctions: 2, iommuEnabled: iommu)
        let reported = FaultCount()
        platform.iommu.setFaultHandler { _ in reported.add() }
        let guest = try GuestProgram.load("sriov-vf")
        let other = try Machine(image: guest, configuration: MachineConfiguration(memorySize: 32 << 20),
                                engine: try EngineSelection.make(engine), serialOutput: { _ in })
        let memory: GuestMemory, offset: UInt64, target: UInt64
        if victim == "VMM" {
            memory = platform.vmmMemory
            offset = 0x1000
            target = DeviceAssignmentPlatform.vmmBase + offset
        } else {
            memory = other.memory
            offset = 0x40_0000
            target = DeviceAssignmentPlatform.hostBase(ofVM: 1) + offset
        }
        let output = GuestOutput()
        let m = try Machine(image: guest, configuration: MachineConfiguration(memorySize: 32 << 20, commandLine: "mode=2 target=0x\(String(target, radix: 16))",
                                                                             timeoutSeconds: 120),
                            engine: try EngineSelection.make(engine), serialOutput: output.append)
        try platform.assign(vf: 0, to: m, name: "attacker")
        try platform.assign(vf: 1, to: other, name: "victim")
        try memory.fill(0x5A, at: offset, count: 4096)
        platform.start()
        defer { platform.stop() }
        let r = try m.run()
        let text = output.text
        guard r.stopReason == .exitPort(status: 0) else {
            throw LabError.guestFailed(what: "attack (IOMMU \(iommu ? "on" : "off"), \(victim))", reason: r.stopReason.summary, output: text)
        }
        func result(_ key: String) -> String {
            guard let range = text.firstRange(of: key + "=") else { return "?" }
            return String(text[range.upperBound...].prefix { $0.isLetter })
        }
        let changed = try memory.read(at: offset, count: 4096).filter { $0 != 0x5A }.count
        let faults = platform.iommu.faultLog.faults
        return IsolationCase(iommu: iommu, victim: victim, receiveInto: result("rx-attack"), transmitFrom: result("tx-attack"),
                             faultsLogged: faults.count, faultsReported: reported.value, victimBytesChanged: changed, faults: faults.map(\.description))
    }

    package static func table(_ r: Result) -> LabTable {
        var rows = r.throughput.map { p in
            [p.page, String(p.iotlbEntries), String(p.translations), "\((p.missRate * 100).fixed(1))%",
             p.bytesPerTranslation.fixed(0), p.measuredGbps.fixed(2),
             p.modelGbps.fixed(2), p.bound]
        }
        rows.append(["", "", "", "", "", "", "", ""])
        for e in r.exchange {
            rows.append(["VM↔VM \(e.page)", String(e.iotlbEntries), String(e.translations), "\((e.missRate * 100).fixed(1))%",
                         "\(e.roundTrips) echoes", "\(e.roundTripsPerSecond.fixed(0))/s", "faults \(e.faults)", ""])
        }
        for c in r.isolation {
            rows.append(["IOMMU \(c.iommu ? "on" : "off")", "→ \(c.victim)", "rx: \(c.receiveInto)", "tx: \(c.transmitFrom)",
                         "faults \(c.faultsLogged) (reported \(c.faultsReported))", "changed \(c.victimBytesChanged) B", "", ""])
        }
        let notes = [
            "budget: \((r.budget.translationsPerSecond / 1e6).fixed(0)) M translations/s, \(r.budget.missNanoseconds.fixed(0)) ns per IOTLB miss; link \(r.linkGbps.fixed(0)) Gb/s; \(r.transferBytes >> 10) KiB transfers over a \(r.poolBytes >> 20) MiB pool; "
                + "IOTLB replacement \(r.replacement).",
            "measured: real DMA through the IOMMU model, its counted translations and misses charged to the budget; model: min(link, translations/s × bytes per translation), miss rate 100% when the pool's pages exceed the IOTLB, else 0.",
            "VM↔VM: two sriov-vf guests (\(r.engine) engine, CPL3) ping-pong frames through their VFs' switch: every descriptor and frame DMA goes through the IOMMU (the echo rate is the guests' and this host's, not the model's).",
            "isolation (\(r.engine) engine, guest at CPL3): the guest posts a receive buffer at, and transmits from, the victim's host-physical address. With the IOMMU the VF's domain has no such IOVA: both DMAs fault and are logged; without it they land.",
        ]
        return LabTable(title: "S4 SR-IOV behind an IOMMU: DMA throughput vs I/O page size and IOTLB size, and isolation",
                        columns: ["page", "IOTLB", "translations", "miss rate", "B/translation", "measured Gb/s", "model Gb/s", "bound"],
                        rows: rows, notes: notes)
    }

    package static func chart(_ r: Result) -> BarChart {
        BarChart(title: "S4: VF DMA throughput by I/O page size and IOTLB entries (link \(Int(r.linkGbps)) Gb/s)",
                 categories: r.throughput.map { "\($0.page), \($0.iotlbEntries)" },
                 series: [("measured (Gb/s)", r.throughput.map(\.measuredGbps)), ("model (Gb/s)", r.throughput.map(\.modelGbps))],
                 yLabel: "Gb/s")
    }
}

/// Faults reported to the lab's handler (from the NIC engine's thread).
private final class FaultCount: Sendable {
    private let count = Atomic<Int>(0)
    func add() { count.add(1, ordering: .relaxed) }
    var value: Int { count.load(ordering: .relaxed) }
}
