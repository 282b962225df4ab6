import Dispatch
import Synchronization
import VirtCore

/// The Intel 8254 programmable interval timer at ports 0x40–0x43, its three channels
/// counting down at 1.193182 MHz: channel 0's output is IRQ0, channel 2's gate and output
/// are bits 0 and 5 of port 0x61 (`SystemControlPort`), which Linux's TSC calibration
/// (`quick_pit_calibrate`, `pit_calibrate_tsc`) polls. Modes 0–5 (6 and 7 are 2 and 3),
/// binary and BCD counts, LSB/MSB/both access, the counter-latch and read-back commands,
/// the gate (level for modes 0, 2, 3, 4; rising edge for 1, 2, 3, 5).
///
/// The count follows `now`, the platform's clock in nanoseconds: on the software engine
/// the TSC of the vCPU that reads it (1 GHz nominal), so a guest that calibrates its TSC
/// against the PIT measures the TSC's true rate however fast the host runs it. IRQ0's
/// pulses (channel 0's rising edges: each period in modes 2 and 3, once at the terminal
/// count in modes 0 and 4) are timed on the host's clock. A new count takes effect at once,
/// in every mode (the real part waits for the current period's end in modes 2 and 3).
public final class ProgrammableIntervalTimer: PortIODevice, Sendable {
    public static let port: UInt16 = 0x40
    public static let portCount = 4
    /// The input clock: 105/88 MHz.
    public static let frequency: UInt64 = 1_193_182
    /// ISA IRQ 0.
    public static let irq = 0
    public var name: String { "8254-pit" }

    /// One channel's programming and where its count stands.
    struct Channel: Codable, Equatable {
        var mode: UInt8 = 0
        /// Access: 1 LSB only, 2 MSB only, 3 LSB then MSB.
        var access: UInt8 = 3
        var bcd = false
        /// The count register as last written (0 stands for 65536, or 10000 in BCD).
        var reload: UInt16 = 0
        /// The first (low) byte of a two-byte count, written; the high byte is awaited.
        var pendingLow: UInt8?
        /// Reads of a two-byte value: the high byte comes next.
        var readHigh = false
        var latchedCount: UInt16?
        var latchedStatus: UInt8?
        /// Ticks counted before the gate stopped the count (modes 0 and 4), or 0.
        var heldTicks: UInt64 = 0
        /// The clock time counting (re)started from, when counting.
        var started: UInt64?
        /// A count was written and is not yet loaded into the counter (status bit 6).
        var nullCount = true
        var gate: Bool
        /// Output before any count (modes 0: low; others: high).
        var outputIdle = true
    }

    /// The channels and port 0x61's writable bits (gate 2, speaker, parity/channel check).
    public struct SavedState: Codable, Sendable, Equatable {
        fileprivate var channels: [Channel]
        fileprivate var controlPort: UInt8
        /// Each counting channel's ticks since it started, for a clock that restarts.
        fileprivate var elapsed: [UInt64?]
    }

    private struct State {
        var channels = [Channel(gate: true), Channel(gate: true), Channel(gate: false)]
        var controlPort: UInt8 = 0
        var irqTimer: DispatchSourceTimer?
        var irqGeneration: UInt64 = 0
    }
    private let state = Mutex(State())
    private let now: @Sendable () -> UInt64
    private let irq0 = LockedFunction<@Sendable (Bool) -> Void>()
    private let queue = DispatchQueue(label: "swiftvisor.pit-irq0")

    /// `now`: the platform clock in nanoseconds (host monotonic time by default).
    public init(now: @escaping @Sendable () -> UInt64 = { monotonicNanoseconds() }) {
        self.now = now
    }

    deinit { state.withLock { $0.irqTimer?.cancel() } }

    /// Where channel 0's output goes (IRQ0's line); set before the guest runs.
    public func connectIRQ0(_ line: @escaping @Sendable (Bool) -> Void) { irq0.set(line) }

    // MARK: Counting

    private static func modulus(_ c: Channel) -> UInt64 {
        if c.reload == 0 { return c.bcd ? 10_000 : 65_536 }
        return c.bcd ? UInt64(fromBCD(c.reload)) : UInt64(c.reload)
    }

    private static func fromBCD(_ v: UInt16) -> UInt16 {
        (v >> 12 & 0xF) * 1000 + (v >> 8 & 0xF) * 100 + (v >> 4 & 0xF) * 10 + (v & 0xF)
    }

    private static func toBCD(_ v: UInt64) -> UInt16 {
        let n = UInt16(v % 10_000)
        return (n / 1000) << 12 | (n / 100 % 10) << 8 | (n / 10 % 10) << 4 | n % 10
    }

    /// PIT ticks in `nanoseconds`.
    public static func ticks(nanoseconds: UInt64) -> UInt64 {
        let (high, low) = nanoseconds.multipliedFullWidth(by: frequency)
        return UInt64(1_000_000_000).dividingFullWidth((high, low)).quotient
    }

    /// Ticks the channel has counted at `time` (nil: not counting).
    private static func counted(_ c: Channel, at time: UInt64) -> UInt64? {
        guard let start = c.started else { return c.heldTicks == 0 ? nil : c.heldTicks }
        return c.heldTicks &+ ticks(nanoseconds: time &- start)
    }

    /// The effective mode (6 and 7 are 2 and 3).
    private static func mode(_ c: Channel) -> UInt8 { c.mode >= 6 ? c.mode - 4 : c.mode }

    /// The counter's value and output at `time`.
    private static func counter(_ c: Channel, at time: UInt64) -> (value: UInt64, output: Bool) {
        let n = modulus(c)
        guard let t = counted(c, at: time) else { return (n % (c.bcd ? 10_000 : 65_536), c.outputIdle) }
        let wrap: UInt64 = c.bcd ? 10_000 : 65_536
        switch mode(c) {
        case 0:  // interrupt on terminal count: output rises at 0 and stays; the counter wraps on
            return ((n &+ wrap &- t % wrap) % wrap, t >= n)
        case 1:  // hardware one-shot: output low from the trigger to the terminal count
            return ((n &+ wrap &- t % wrap) % wrap, t >= n)
        case 2:  // rate generator: N … 1, output low while the count is 1
            let value = n - t % n
            return (value, value != 1)
        case 3:  // square wave: counts down by two, output high for the first (larger) half
            let p = t % n, high = (n + 1) / 2
            return p < high ? (n - 2 * p, true) : (n - 2 * (p - high), false)
        default:  // 4, 5 strobes: output low for the one tick at the terminal count
            return ((n &+ wrap &- t % wrap) % wrap, t != n)
        }
    }

    private static func displayed(_ c: Channel, _ value: UInt64) -> UInt16 {
        c.bcd ? toBCD(value) : UInt16(truncatingIfNeeded: value)
    }

    private static func status(_ c: Channel, at time: UInt64) -> UInt8 {
        (counter(c, at: time).output ? 0x80 : 0) | (c.nullCount ? 0x40 : 0) | c.access << 4 | c.mode << 1 | (c.bcd ? 1 : 0)
    }

    // MARK: Ports 0x40–0x43

    public func portRead(offset: UInt16, size: UInt8) -> UInt32 {
        guard offset < 3 else { return 0xFF }  // the control word is write-only
        let time = now()
        return state.withLock { s -> UInt32 in
            var c = s.channels[Int(offset)]
            defer { s.channels[Int(offset)] = c }
            if let status = c.latchedStatus {
                c.latchedStatus = nil
                return UInt32(status)
            }
            let value = c.latchedCount ?? Self.displayed(c, Self.counter(c, at: time).value)
            let byte: UInt16
            switch c.access {
            case 1: byte = value & 0xFF; c.latchedCount = nil
            case 2: byte = value >> 8; c.latchedCount = nil
            default:
                byte = c.readHigh ? value >> 8 : value & 0xFF
                if c.readHigh { c.latchedCount = nil }
                c.readHigh.toggle()
            }
            return UInt32(byte)
        }
    }

    public func portWrite(offset: UInt16, size: UInt8, value: UInt32) {
        let byte = UInt8(truncatingIfNeeded: value)
        let time = now()
        state.withLock { s in
            if offset == 3 { control(&s, byte, at: time) } else { writeCount(&s, channel: Int(offset), byte, at: time) }
        }
    }

    private func control(_ s: inout State, _ word: UInt8, at time: UInt64) {
        let select = Int(word >> 6)
        if select == 3 {  // read-back: bit 5 clear latches counts, bit 4 clear latches status
            for k in 0..<3 where word & (2 << UInt8(k)) != 0 {
                var c = s.channels[k]
                if word & 0x20 == 0 && c.latchedCount == nil {
                    c.latchedCount = Self.displayed(c, Self.counter(c, at: time).value)
                    c.readHigh = false
                }
                if word & 0x10 == 0 && c.latchedStatus == nil { c.latchedStatus = Self.status(c, at: time) }
                s.channels[k] = c
            }
            return
        }
        var c = s.channels[select]
        let access = (word >> 4) & 3
        if access == 0 {  // counter latch: the first latch holds until it is read
            if c.latchedCount == nil {
                c.latchedCount = Self.displayed(c, Self.counter(c, at: time).value)
                c.readHigh = false
            }
            s.channels[select] = c
            return
        }
        c.access = access
        c.mode = (word >> 1) & 7
        c.bcd = word & 1 != 0
        c.pendingLow = nil
        c.readHigh = false
        c.latchedCount = nil
        c.latchedStatus = nil
        c.started = nil
        c.heldTicks = 0
        c.nullCount = true
        c.outputIdle = Self.mode(c) != 0
        s.channels[select] = c
        if select == 0 { rescheduleIRQ0(&s, at: time) }
    }

    private func writeCount(_ s: inout State, channel k: Int, _ byte: UInt8, at time: UInt64) {
        var c = s.channels[k]
        switch c.access {
        case 1: c.reload = UInt16(byte)
        case 2: c.reload = UInt16(byte) << 8
        default:
            guard let low = c.pendingLow else {
                c.pendingLow = byte
                if Self.mode(c) == 0 {  // the first byte stops a mode-0 count
                    c.heldTicks = 0
                    c.started = nil
                }
                s.channels[k] = c
                return
            }
            c.reload = UInt16(byte) << 8 | UInt16(low)
            c.pendingLow = nil
        }
        c.nullCount = false
        c.heldTicks = 0
        c.outputIdle = Self.mode(c) != 0
        // Modes 1 and 5 wait for a rising gate; the others count while the gate is high.
        let triggered = Self.mode(c) == 1 || Self.mode(c) == 5
        c.started = !triggered && c.gate ? time : nil
        s.channels[k] = c
        if k == 0 { rescheduleIRQ0(&s, at: time) }
    }

    /// Gate `k` to `level` (channel 2's is port 0x61 bit 0; 0 and 1 are wired high).
    private func setGate(_ s: inout State, channel k: Int, _ level: Bool, at time: UInt64) {
        var c = s.channels[k]
        let wasHigh = c.gate
        c.gate = level
        guard wasHigh != level, !c.nullCount, c.pendingLow == nil else { s.channels[k] = c; return }
        switch Self.mode(c) {
        case 0, 4:  // the gate suspends the count
            if level { c.started = time } else if let t = Self.counted(c, at: time) { c.heldTicks = t; c.started = nil }
        case 2, 3:  // low stops it (output high); the rising edge reloads
            c.heldTicks = 0
            c.started = level ? time : nil
        default:  // 1, 5: the rising edge (re)triggers
            if level { c.heldTicks = 0; c.started = time }
        }
        s.channels[k] = c
        if k == 0 { rescheduleIRQ0(&s, at: time) }
    }

    // MARK: IRQ0

    /// Arms the host timer for channel 0's next rising edges (none unless it counts).
    private func rescheduleIRQ0(_ s: inout State, at time: UInt64) {
        s.irqTimer?.cancel()
        s.irqTimer = nil
        s.irqGeneration &+= 1
        let c = s.channels[0]
        guard let t = Self.counted(c, at: time), c.started != nil else { return }
        let n = Self.modulus(c)
        let periodic: Bool, remaining: UInt64
        switch Self.mode(c) {
        case 2, 3: periodic = true; remaining = n - t % n
        case 0, 4: periodic = false; guard t < n else { return }; remaining = n - t
        default: return  // channel 0's gate is always high: 1 and 5 never trigger
        }
        let nanoseconds = { (ticks: UInt64) in Int(min(ticks * 1_000_000_000 / Self.frequency, UInt64(Int.max))) }
        let generation = s.irqGeneration
        let timer = DispatchSource.makeTimerSource(queue: queue)
        if periodic {
            // Rising edges at most every 100 µs: a guest programming a tiny count cannot flood the host.
            timer.schedule(deadline: .now() + .nanoseconds(nanoseconds(remaining)), repeating: .nanoseconds(max(nanoseconds(n), 100_000)),
                           leeway: .microseconds(50))
        } else {
            timer.schedule(deadline: .now() + .nanoseconds(nanoseconds(remaining)), leeway: .microseconds(50))
        }
        timer.setEventHandler { [weak self] in self?.irq0Edge(generation: generation) }
        s.irqTimer = timer
        timer.resume()
    }

    private func irq0Edge(generation: UInt64) {
        guard state.withLock({ $0.irqGeneration == generation }), let line = irq0.function else { return }
        line(true)
        line(false)
    }

    // MARK: Port 0x61

    /// Port 0x61, system control port B: writes set channel 2's gate (bit 0), the speaker
    /// (bit 1) and the parity/channel-check enables (2, 3); reads add the refresh toggle
    /// (bit 4, flipping every 15.085 µs) and channel 2's output (bit 5).
    public final class SystemControlPort: PortIODevice, Sendable {
        public static let port: UInt16 = 0x61
        public var name: String { "port-61" }
        private let pit: ProgrammableIntervalTimer
        public init(pit: ProgrammableIntervalTimer) { self.pit = pit }

        public func portRead(offset: UInt16, size: UInt8) -> UInt32 {
            let time = pit.now()
            return pit.state.withLock { s in
                let out = ProgrammableIntervalTimer.counter(s.channels[2], at: time).output
                let refresh = (time / 15_085) & 1 != 0
                return UInt32(s.controlPort & 0x0F) | (refresh ? 0x10 : 0) | (out ? 0x20 : 0)
            }
        }

        public func portWrite(offset: UInt16, size: UInt8, value: UInt32) {
            let time = pit.now()
            pit.state.withLock { s in
                s.controlPort = UInt8(truncatingIfNeeded: value) & 0x0F
                pit.setGate(&s, channel: 2, value & 1 != 0, at: time)
            }
        }
    }

    // MARK: Snapshot

    /// Call with the vCPUs paused.
    public var savedState: SavedState {
        let time = now()
        return state.withLock { s in
            SavedState(channels: s.channels, controlPort: s.controlPort,
                       elapsed: s.channels.map { c in c.started.map { time &- $0 } })
        }
    }

    /// Restores `savedState` before the vCPUs run: each counting channel goes on from where it was.
    public func restore(_ saved: SavedState) throws(DeviceStateError) {
        guard saved.channels.count == 3, saved.elapsed.count == 3 else {
            throw DeviceStateError(device: name, "\(saved.channels.count) channels (3 expected)")
        }
        for c in saved.channels where c.access == 0 || c.access > 3 || c.mode > 7 {
            throw DeviceStateError(device: name, "access mode \(c.access), counting mode \(c.mode)")
        }
        let time = now()
        state.withLock { s in
            s.channels = saved.channels
            for k in 0..<3 { s.channels[k].started = saved.elapsed[k].map { time &- $0 } }
            s.controlPort = saved.controlPort & 0x0F
            rescheduleIRQ0(&s, at: time)
        }
    }
}
