import Synchronization
import VirtCore

/// Port 0xF4: a guest write stops the VM with exit status `value & 0xFF` — the port and
/// meaning of QEMU's isa-debug-exit, without its `(v << 1) | 1` encoding.
public final class ExitPort: PortIODevice, Sendable {
    public static let port: UInt16 = 0xF4
    public var name: String { "exit-port" }
    private let onExit: @Sendable (UInt8) -> Void

    /// `onExit` runs on the vCPU thread that wrote the port.
    public init(onExit: @escaping @Sendable (UInt8) -> Void) { self.onExit = onExit }

    public func portRead(offset: UInt16, size: UInt8) -> UInt32 { 0 }
    public func portWrite(offset: UInt16, size: UInt8, value: UInt32) { onExit(UInt8(truncatingIfNeeded: value)) }
}

/// Port 0x80 (the PC's POST-code port): writes are counted and otherwise ignored. The
/// `pio-loop` guest uses it to measure the cost of a trapped port write.
public final class BenchPort: PortIODevice, Sendable {
    public static let port: UInt16 = 0x80
    public var name: String { "bench-port" }
    private let writeCount = Atomic<UInt64>(0)
    private let lastValue = Atomic<UInt32>(0)

    public init() {}

    public var writes: UInt64 { writeCount.load(ordering: .relaxed) }
    public var lastWritten: UInt32 { lastValue.load(ordering: .relaxed) }

    public func portRead(offset: UInt16, size: UInt8) -> UInt32 { lastValue.load(ordering: .relaxed) }
    public func portWrite(offset: UInt16, size: UInt8, value: UInt32) {
        writeCount.add(1, ordering: .relaxed)
        lastValue.store(value, ordering: .relaxed)
    }
}

/// Port 0xF5: the guest runtime's first instruction writes it, so the VMM knows when guest
/// code started (`swiftvisor bench startup`). Keeps the first write's host times only.
public final class BootMarkerPort: PortIODevice, Sendable {
    public static let port: UInt16 = 0xF5
    public var name: String { "boot-marker" }
    /// CLOCK_MONOTONIC and this process's CPU time at the first write (0: none yet).
    private let firstWrite = Atomic<UInt64>(0)
    private let firstWriteCPU = Atomic<UInt64>(0)

    public init() {}

    public var firstWriteNanoseconds: UInt64? { let t = firstWrite.load(ordering: .acquiring); return t == 0 ? nil : t }
    /// Process CPU time (all threads) spent before the guest's first instruction.
    public var cpuNanosecondsBeforeFirstWrite: UInt64? { firstWriteNanoseconds == nil ? nil : firstWriteCPU.load(ordering: .relaxed) }

    public func portRead(offset: UInt16, size: UInt8) -> UInt32 { 0 }
    public func portWrite(offset: UInt16, size: UInt8, value: UInt32) {
        guard firstWrite.load(ordering: .relaxed) == 0 else { return }
        firstWriteCPU.store(processCPUNanoseconds(), ordering: .relaxed)
        _ = firstWrite.compareExchange(expected: 0, desired: monotonicNanoseconds(), ordering: .releasing)
    }
}
