import Synchronization
import VirtCore

/// A 16550A UART as PC serial ports have it (eight registers from the base port).
///
/// Output bytes go to `output` as the guest writes them; input is queued by the host with
/// `enqueueInput` and read by the guest through RBR. The transmitter is infinitely fast,
/// so LSR.THRE/TEMT are always set. Interrupt enables and identification are modelled so
/// a driver probing the chip sees a 16550A; the interrupt line itself is `irqLine`.
public final class UART16550: PortIODevice, Sendable {
    public static let com1: UInt16 = 0x3F8
    /// COM1's ISA interrupt line.
    public static let com1IRQ = 4
    public static let registerCount = 8

    public let name: String

    private struct Registers {
        var ier: UInt8 = 0
        var lcr: UInt8 = 0x03
        var mcr: UInt8 = 0
        var scr: UInt8 = 0
        var dll: UInt8 = 0x0C  // 9600 baud
        var dlm: UInt8 = 0
        var fifoEnabled = false
        var input: [UInt8] = []
        var inputHead = 0
        /// THR-empty interrupt pending (cleared by reading IIR or writing THR).
        var thrEmptyPending = false

        var hasInput: Bool { inputHead < input.count }
        var dlab: Bool { lcr & 0x80 != 0 }
        var loopback: Bool { mcr & 0x10 != 0 }
    }

    private let state = Mutex(Registers())
    private let output: @Sendable (UInt8) -> Void
    /// Raised/lowered when the interrupt condition changes (nil: no interrupt line wired).
    private let wiredLine: LockedFunction<@Sendable (Bool) -> Void>

    public init(name: String = "com1", output: @escaping @Sendable (UInt8) -> Void,
                irqLine: (@Sendable (Bool) -> Void)? = nil) {
        self.name = name
        self.output = output
        wiredLine = LockedFunction(irqLine)
    }

    /// Wires the interrupt line (a platform's interrupt controller input), replacing any
    /// earlier one. Before the guest runs.
    public func connectInterruptLine(_ line: @escaping @Sendable (Bool) -> Void) {
        wiredLine.set(line)
    }

    private func irqLine(_ level: Bool) {
        guard let line = wiredLine.function else { return }
        line(level)
    }

    /// Queues bytes for the guest to read (e.g. from the host terminal).
    public func enqueueInput<C: Collection>(_ bytes: C) where C.Element == UInt8 {
        let irq = state.withLock { r -> Bool in
            if r.inputHead > 4096 { r.input.removeFirst(r.inputHead); r.inputHead = 0 }
            r.input.append(contentsOf: bytes)
            return Self.interruptPending(r)
        }
        irqLine(irq)
    }

    public var pendingInputCount: Int { state.withLock { $0.input.count - $0.inputHead } }

    /// The registers a guest programmed, for snapshots: IER, LCR, MCR, SCR, DLL, DLM, a flags
    /// byte (bit 0 FIFO enabled, bit 1 THR-empty interrupt pending), then the unread input bytes.
    public var savedState: [UInt8] {
        state.withLock { r in
            [r.ier, r.lcr, r.mcr, r.scr, r.dll, r.dlm, (r.fifoEnabled ? 1 : 0) | (r.thrEmptyPending ? 2 : 0)] + Array(r.input[r.inputHead...])
        }
    }

    /// Restores `savedState`; a state of the wrong shape is ignored (the defaults stay).
    public func restore(state saved: [UInt8]) {
        guard saved.count >= 7 else { return }
        state.withLock { r in
            r.ier = saved[0] & 0x0F; r.lcr = saved[1]; r.mcr = saved[2] & 0x1F; r.scr = saved[3]
            r.dll = saved[4]; r.dlm = saved[5]; r.fifoEnabled = saved[6] & 1 != 0
            r.input = Array(saved[7...]); r.inputHead = 0
            r.thrEmptyPending = saved[6] & 2 != 0
        }
    }

    /// Drives the interrupt line with the current condition: after a restore, so the
    /// controller's view of the line matches the restored UART (an input that then arrives
    /// is an edge again).
    public func resendInterruptLine() {
        irqLine(state.withLock { Self.interruptPending($0) })
    }

    private static func interruptPending(_ r: Registers) -> Bool {
        (r.ier & 0x01 != 0 && r.hasInput) || (r.ier & 0x02 != 0 && r.thrEmptyPending)
    }

    public func portRead(offset: UInt16, size: UInt8) -> UInt32 {
        var irq: Bool?
        let value = state.withLock { r -> UInt8 in
            switch offset {
            case 0:
                if r.dlab { return r.dll }
                guard r.hasInput else { return 0 }
                let b = r.input[r.inputHead]
                r.inputHead += 1
                irq = Self.interruptPending(r)
                return b
            case 1: return r.dlab ? r.dlm : r.ier
            case 2:
                // IIR: bits 7:6 = FIFOs enabled; bits 3:0 = highest-priority pending source.
                let fifo: UInt8 = r.fifoEnabled ? 0xC0 : 0
                if r.ier & 0x01 != 0 && r.hasInput { return fifo | 0x04 }
                if r.ier & 0x02 != 0 && r.thrEmptyPending {
                    r.thrEmptyPending = false
                    irq = Self.interruptPending(r)
                    return fifo | 0x02
                }
                return fifo | 0x01
            case 3: return r.lcr
            case 4: return r.mcr
            case 5: return 0x60 | (r.hasInput ? 0x01 : 0)  // THRE | TEMT | DR
            case 6:
                // MSR: in loopback, the modem inputs follow MCR's outputs; else CTS+DSR+DCD.
                if r.loopback { return ((r.mcr & 0x02) << 3) | ((r.mcr & 0x01) << 5) | ((r.mcr & 0x04) << 4) | ((r.mcr & 0x08) << 4) }
                return 0xB0
            case 7: return r.scr
            default: return 0xFF
            }
        }
        if let irq { irqLine(irq) }
        return UInt32(value)
    }

    public func portWrite(offset: UInt16, size: UInt8, value: UInt32) {
        let byte = UInt8(truncatingIfNeeded: value)
        var emit = false
        let irq = state.withLock { r -> Bool in
            switch offset {
            case 0:
                if r.dlab { r.dll = byte; break }
                if r.loopback { r.input.append(byte) } else { emit = true }
                r.thrEmptyPending = true
            case 1:
                if r.dlab { r.dlm = byte; break }
                let enablingTHRE = r.ier & 0x02 == 0 && byte & 0x02 != 0
                r.ier = byte & 0x0F
                if enablingTHRE { r.thrEmptyPending = true }
            case 2:
                r.fifoEnabled = byte & 0x01 != 0
                if byte & 0x02 != 0 { r.input.removeAll(); r.inputHead = 0 }
            case 3: r.lcr = byte
            case 4: r.mcr = byte & 0x1F
            case 7: r.scr = byte
            default: break  // LSR and MSR are read-only
            }
            return Self.interruptPending(r)
        }
        if emit { output(byte) }
        irqLine(irq)
    }
}
