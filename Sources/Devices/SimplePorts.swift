import Synchronization

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
