import CHost
#if canImport(Glibc)
import Glibc
#endif

/// Count and host time of a class of exits.
public struct ExitCounter: Sendable, Equatable, Codable {
    public var count: UInt64 = 0
    /// Host nanoseconds the VMM spent handling these exits (engine return → next entry).
    public var nanoseconds: UInt64 = 0
    public init(count: UInt64 = 0, nanoseconds: UInt64 = 0) { self.count = count; self.nanoseconds = nanoseconds }

    @inline(__always)
    public mutating func add(nanoseconds ns: UInt64) {
        count &+= 1
        nanoseconds &+= ns
    }

    public static func + (a: ExitCounter, b: ExitCounter) -> ExitCounter {
        ExitCounter(count: a.count + b.count, nanoseconds: a.nanoseconds + b.nanoseconds)
    }
}

/// Exit accounting for one vCPU (no locking: each vCPU thread owns its own and they are
/// merged afterwards). Recording is allocation-free once a port or range has been seen.
public struct ExitStatistics: Sendable, Equatable {
    private var reasons = [ExitCounter](repeating: ExitCounter(), count: ExitReason.allCases.count)
    private var portCounters: [UInt16: ExitCounter] = [:]
    /// One-entry cache in front of `portCounters`: a guest usually hits the same port many
    /// times in a row, and this keeps the dictionary off the per-exit path.
    private var cachedPort: UInt16 = 0
    private var cachedPortCounter = ExitCounter()
    public private(set) var mmioRanges: [UInt64: ExitCounter] = [:]
    /// Total nanoseconds spent inside the engine's `run()` (guest time plus exit overhead).
    public var guestNanoseconds: UInt64 = 0

    public init() {}

    public static func == (a: ExitStatistics, b: ExitStatistics) -> Bool {
        a.reasons == b.reasons && a.ports == b.ports && a.mmioRanges == b.mmioRanges && a.guestNanoseconds == b.guestNanoseconds
    }

    @inline(__always)
    public mutating func record(_ reason: ExitReason, nanoseconds: UInt64) {
        reasons[reason.rawValue].add(nanoseconds: nanoseconds)
    }

    @inline(__always)
    public mutating func recordPort(_ port: UInt16, nanoseconds: UInt64) {
        if port != cachedPort && cachedPortCounter.count != 0 {
            portCounters[cachedPort, default: ExitCounter()] = portCounters[cachedPort, default: ExitCounter()] + cachedPortCounter
            cachedPortCounter = ExitCounter()
        }
        cachedPort = port
        cachedPortCounter.add(nanoseconds: nanoseconds)
    }

    /// Count and time per port.
    public var ports: [UInt16: ExitCounter] {
        var p = portCounters
        if cachedPortCounter.count != 0 { p[cachedPort, default: ExitCounter()] = p[cachedPort, default: ExitCounter()] + cachedPortCounter }
        return p
    }

    @inline(__always)
    public mutating func recordMMIO(rangeBase: UInt64, nanoseconds: UInt64) {
        mmioRanges[rangeBase, default: ExitCounter()].add(nanoseconds: nanoseconds)
    }

    public subscript(reason: ExitReason) -> ExitCounter { reasons[reason.rawValue] }

    /// Multiplies every recorded time by `factor`: a run loop records TSC ticks and converts
    /// them once at the end, with the tick rate measured over the run itself.
    public mutating func scaleTimes(by factor: Double) {
        func scaled(_ c: ExitCounter) -> ExitCounter { ExitCounter(count: c.count, nanoseconds: UInt64(Double(c.nanoseconds) * factor)) }
        reasons = reasons.map(scaled)
        portCounters = portCounters.mapValues(scaled)
        cachedPortCounter = scaled(cachedPortCounter)
        mmioRanges = mmioRanges.mapValues(scaled)
        guestNanoseconds = UInt64(Double(guestNanoseconds) * factor)
    }

    public var totalExits: UInt64 { reasons.reduce(0) { $0 + $1.count } }

    public mutating func merge(_ other: ExitStatistics) {
        for i in reasons.indices { reasons[i] = reasons[i] + other.reasons[i] }
        portCounters = ports
        cachedPortCounter = ExitCounter()
        for (k, v) in other.ports { portCounters[k, default: ExitCounter()] = portCounters[k, default: ExitCounter()] + v }
        for (k, v) in other.mmioRanges { mmioRanges[k, default: ExitCounter()] = mmioRanges[k, default: ExitCounter()] + v }
        guestNanoseconds += other.guestNanoseconds
    }

    /// A human-readable table. `portName`/`rangeName` label ports and MMIO ranges.
    public func table(portName: (UInt16) -> String = { _ in "" }, rangeName: (UInt64) -> String = { _ in "" }) -> String {
        var rows: [[String]] = [["exit", "count", "host time", "avg"]]
        func row(_ label: String, _ c: ExitCounter) -> [String] {
            let avg = c.count == 0 ? 0 : Double(c.nanoseconds) / Double(c.count)
            return [label, String(c.count), Self.formatNanoseconds(Double(c.nanoseconds)), Self.formatNanoseconds(avg)]
        }
        for r in ExitReason.allCases where reasons[r.rawValue].count > 0 {
            rows.append(row(r.name, reasons[r.rawValue]))
        }
        for (port, c) in ports.sorted(by: { $0.key < $1.key }) {
            let name = portName(port)
            rows.append(row("  port 0x" + String(port, radix: 16) + (name.isEmpty ? "" : " (\(name))"), c))
        }
        for (base, c) in mmioRanges.sorted(by: { $0.key < $1.key }) {
            let name = rangeName(base)
            rows.append(row("  mmio 0x" + String(base, radix: 16) + (name.isEmpty ? "" : " (\(name))"), c))
        }
        rows.append(["total", String(totalExits), "", ""])
        let widths = (0..<4).map { col in rows.map { $0[col].count }.max() ?? 0 }
        return rows.map { r in
            r.enumerated().map { i, cell in
                i == 0 ? cell.padded(to: widths[i]) : cell.leftPadded(to: widths[i])
            }.joined(separator: "  ")
        }.joined(separator: "\n")
    }

    /// The statistics as a `Codable` value: totals, and count and host time per exit reason,
    /// per port and per MMIO range (keys "0x3f8").
    public struct Report: Codable, Sendable, Equatable {
        public var total: UInt64
        public var guestNanoseconds: UInt64
        public var reasons: [String: ExitCounter]
        public var ports: [String: ExitCounter]
        public var mmio: [String: ExitCounter]
    }

    public var report: Report {
        func hex(_ v: some BinaryInteger) -> String { "0x" + String(v, radix: 16) }
        var byReason: [String: ExitCounter] = [:]
        for r in ExitReason.allCases where reasons[r.rawValue].count > 0 { byReason[r.name] = reasons[r.rawValue] }
        return Report(total: totalExits, guestNanoseconds: guestNanoseconds, reasons: byReason,
                      ports: Dictionary(uniqueKeysWithValues: ports.map { (hex($0.key), $0.value) }),
                      mmio: Dictionary(uniqueKeysWithValues: mmioRanges.map { (hex($0.key), $0.value) }))
    }

    public static func formatNanoseconds(_ ns: Double) -> String {
        if ns >= 1e9 { return (ns / 1e9).fixed(2) + " s" }
        if ns >= 1e6 { return (ns / 1e6).fixed(2) + " ms" }
        if ns >= 1e3 { return (ns / 1e3).fixed(2) + " µs" }
        return ns.fixed(2) + " ns"
    }
}

/// Monotonic host clock in nanoseconds (vDSO clock_gettime, no allocation).
@inline(__always)
public func monotonicNanoseconds() -> UInt64 {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return UInt64(ts.tv_sec) &* 1_000_000_000 &+ UInt64(ts.tv_nsec)
}

/// CPU time this process has used so far, all threads (CLOCK_PROCESS_CPUTIME_ID).
public func processCPUNanoseconds() -> UInt64 {
    var ts = timespec()
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts)
    return UInt64(ts.tv_sec) &* 1_000_000_000 &+ UInt64(ts.tv_nsec)
}

/// The time-stamp counter as a clock for the per-exit accounting in vCPU loops: reading
/// it touches no memory, where clock_gettime touches the vDSO's code and data pages —
/// which costs TLB misses on every exit when the host switches address spaces per exit.
public enum HostClock {
    @inline(__always)
    public static func ticks() -> UInt64 { host_rdtsc() }

    /// Calibrated once against CLOCK_MONOTONIC over 2 ms (a relative error of ~1e-5; every
    /// run of the tool pays for it, so not longer).
    public static let nanosecondsPerTick: Double = {
        let n0 = monotonicNanoseconds(), t0 = host_rdtsc()
        while monotonicNanoseconds() - n0 < 2_000_000 {}
        let n1 = monotonicNanoseconds(), t1 = host_rdtsc()
        return t1 > t0 ? Double(n1 - n0) / Double(t1 - t0) : 1
    }()

    @inline(__always)
    public static func nanoseconds(ticks: UInt64) -> UInt64 { UInt64(Double(ticks) * nanosecondsPerTick) }

    /// Measures the tick rate over an interval the program spends anyway (a VM's run), so
    /// start-up pays no calibration: `start()` at the beginning, `nanosecondsPerTick` at the end.
    public struct Ruler: Sendable {
        private let ticks0: UInt64, nanoseconds0: UInt64
        public init() { nanoseconds0 = monotonicNanoseconds(); ticks0 = host_rdtsc() }

        /// Nanoseconds per tick between `init` and now; the 2 ms calibration when the interval
        /// was too short to measure (under 100 µs).
        public var nanosecondsPerTick: Double {
            let ns = monotonicNanoseconds(), t = host_rdtsc()
            guard ns &- nanoseconds0 >= 100_000, t > ticks0 else { return HostClock.nanosecondsPerTick }
            return Double(ns &- nanoseconds0) / Double(t &- ticks0)
        }
    }
}

extension String {
    /// Left-aligned in a field of `width` characters (no Foundation needed).
    public func padded(to width: Int) -> String {
        count >= width ? self : self + String(repeating: " ", count: width - count)
    }

    /// Right-aligned in a field of `width` characters.
    public func leftPadded(to width: Int) -> String {
        count >= width ? self : String(repeating: " ", count: width - count) + self
    }
}
