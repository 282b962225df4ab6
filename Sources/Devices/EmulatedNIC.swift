import Synchronization
import VirtCore

/// A NIC with a classic register interface (scenario S2's "emulated" device): the driver
/// programs each packet through MMIO registers — buffer address (two writes), length, a
/// command — and polls a status register, so every packet costs several exits. Frames move
/// by DMA between guest RAM and a `NetworkBackend`, the same backends virtio-net uses.
///
/// Registers (32-bit, offsets in the device's MMIO page):
/// `0x00` ID "NIC1" · `0x04`/`0x08` MAC low/high · `0x10`/`0x14` TX buffer address low/high ·
/// `0x18` TX length · `0x1C` TX command (1: send) · `0x20` STATUS (bit 0 TX done, bit 1 RX
/// ready, bit 2 error; TX done and error clear when read) · `0x30`/`0x34` RX buffer address ·
/// `0x38` RX buffer capacity · `0x3C` RX command (1: copy the next frame in) · `0x40` RX
/// length of the last copied frame · `0x44` interrupt enable (bit 1: RX ready).
public final class EmulatedNIC: MMIODevice, NetworkFrameReceiver, Sendable {
    public static let identifier: UInt32 = 0x3143_494E  // "NIC1"
    public static let maxFrame = 1514
    /// Frames waiting for the driver beyond this are dropped (a small on-chip FIFO).
    public static let receiveFIFO = 64

    enum Register {
        static let id: UInt64 = 0x00, macLow: UInt64 = 0x04, macHigh: UInt64 = 0x08
        static let txAddressLow: UInt64 = 0x10, txAddressHigh: UInt64 = 0x14, txLength: UInt64 = 0x18, txCommand: UInt64 = 0x1C
        static let status: UInt64 = 0x20
        static let rxAddressLow: UInt64 = 0x30, rxAddressHigh: UInt64 = 0x34, rxCapacity: UInt64 = 0x38
        static let rxCommand: UInt64 = 0x3C, rxLength: UInt64 = 0x40, interruptEnable: UInt64 = 0x44
    }
    enum Status { static let txDone: UInt32 = 1, rxReady: UInt32 = 2, error: UInt32 = 4 }

    public struct Statistics: Equatable, Sendable {
        public var transmitted: UInt64 = 0
        public var received: UInt64 = 0
        public var receiveDropped: UInt64 = 0
        /// Commands refused: bad length, buffer outside RAM.
        public var errors: UInt64 = 0
    }

    private struct State {
        var txAddress: UInt64 = 0, txLength: UInt32 = 0
        var rxAddress: UInt64 = 0, rxCapacity: UInt32 = 0, rxLength: UInt32 = 0
        var status: UInt32 = 0
        var interruptEnable: UInt32 = 0
        var lineAsserted = false
        var fifo: [[UInt8]] = []
        var stats = Statistics()
    }

    public let name: String
    public let mac: MACAddress
    private let memory: GuestMemory
    private let backend: any NetworkBackend
    private let interrupt: InterruptLine?
    private let state = Mutex(State())

    public init(memory: GuestMemory, backend: any NetworkBackend, mac: MACAddress = .random(), interrupt: InterruptLine? = nil,
                name: String = "emulated-nic") {
        self.memory = memory
        self.backend = backend
        self.mac = mac
        self.interrupt = interrupt
        self.name = name
        backend.setReceiver(self)
    }

    public var statistics: Statistics { state.withLock { $0.stats } }

    public func mmioRead(offset: UInt64, size: UInt8) -> UInt64 {
        let m = mac.bytes
        return state.withLock { s -> UInt64 in
            switch offset {
            case Register.id: return UInt64(Self.identifier)
            case Register.macLow: return UInt64(m[0]) | UInt64(m[1]) << 8 | UInt64(m[2]) << 16 | UInt64(m[3]) << 24
            case Register.macHigh: return UInt64(m[4]) | UInt64(m[5]) << 8
            case Register.status:
                let v = s.status | (s.fifo.isEmpty ? 0 : Status.rxReady)
                s.status &= ~(Status.txDone | Status.error)
                return UInt64(v)
            case Register.rxLength: return UInt64(s.rxLength)
            case Register.interruptEnable: return UInt64(s.interruptEnable)
            default: return 0
            }
        }
    }

    public func mmioWrite(offset: UInt64, size: UInt8, value: UInt64) {
        let v = UInt32(truncatingIfNeeded: value)
        var frame: [UInt8]?
        state.withLock { s in
            switch offset {
            case Register.txAddressLow: s.txAddress = (s.txAddress & ~0xFFFF_FFFF) | UInt64(v)
            case Register.txAddressHigh: s.txAddress = (s.txAddress & 0xFFFF_FFFF) | UInt64(v) << 32
            case Register.txLength: s.txLength = v
            case Register.txCommand where v & 1 != 0:
                guard s.txLength >= 14, s.txLength <= UInt32(Self.maxFrame),
                      let bytes = try? memory.read(at: s.txAddress, count: Int(s.txLength)) else {
                    s.status |= Status.error
                    s.stats.errors += 1
                    return
                }
                frame = bytes
                s.status |= Status.txDone
                s.stats.transmitted += 1
            case Register.rxAddressLow: s.rxAddress = (s.rxAddress & ~0xFFFF_FFFF) | UInt64(v)
            case Register.rxAddressHigh: s.rxAddress = (s.rxAddress & 0xFFFF_FFFF) | UInt64(v) << 32
            case Register.rxCapacity: s.rxCapacity = v
            case Register.rxCommand where v & 1 != 0:
                guard let next = s.fifo.first else { s.rxLength = 0; return }
                let n = min(next.count, Int(s.rxCapacity))
                do {
                    try memory.write(next[0..<n], at: s.rxAddress)
                } catch {
                    s.status |= Status.error
                    s.stats.errors += 1
                    return
                }
                s.fifo.removeFirst()
                s.rxLength = UInt32(n)
                s.stats.received += 1
                if let level = Self.updateLine(&s) { interrupt?(level) }  // under the lock: edges stay ordered
            case Register.interruptEnable:
                s.interruptEnable = v
                if let level = Self.updateLine(&s) { interrupt?(level) }  // under the lock: edges stay ordered
            default: break
            }
        }
        if let frame { backend.send(frame) }  // outside the lock: the peer may answer at once
    }

    /// Frames from the network, queued for the driver.
    public func receiveFrame(_ frame: [UInt8]) {
        state.withLock { s in
            guard s.fifo.count < Self.receiveFIFO else { s.stats.receiveDropped += 1; return }
            s.fifo.append(frame)
            if let level = Self.updateLine(&s) { interrupt?(level) }  // under the lock: edges stay ordered
        }
    }

    /// The line follows "RX ready and enabled"; returns the new level when it changes.
    private static func updateLine(_ s: inout State) -> Bool? {
        let level = s.interruptEnable & Status.rxReady != 0 && !s.fifo.isEmpty
        guard level != s.lineAsserted else { return nil }
        s.lineAsserted = level
        return level
    }
}
