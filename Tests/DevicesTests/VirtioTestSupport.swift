import Synchronization
import Testing
import VirtCore
@testable import Devices
#if canImport(Glibc)
import Glibc
#endif

typealias Reg = VirtioMMIOTransport.Register

/// Collects what the host side sees: output bytes, log lines, interrupt line changes.
final class VirtioRecorder: Sendable {
    let bytes = Mutex<[UInt8]>([])
    let lines = Mutex<[String]>([])
    let lineChanges = Mutex<[Bool]>([])

    var output: [UInt8] { bytes.withLock { $0 } }
    var text: String { String(decoding: output, as: UTF8.self) }
    var logLines: [String] { lines.withLock { $0 } }
    var interrupts: [Bool] { lineChanges.withLock { $0 } }
    var lineAsserted: Bool { interrupts.last ?? false }

    var sink: @Sendable ([UInt8]) -> Void { { b in self.bytes.withLock { $0 += b } } }
    var log: VirtioDiagnostics.LogSink { { l in self.lines.withLock { $0.append(l) } } }
    var line: InterruptLine { { a in self.lineChanges.withLock { $0.append(a) } } }
}

/// Plays a virtio driver against a `VirtioMMIOTransport`, through the same registers and
/// guest memory a real guest would use. Rings of queue i live at 0x10000 * (i + 1);
/// buffers come from a bump allocator above 0x100000.
final class VirtioTestGuest {
    static let ramSize: UInt64 = 4 << 20
    static let heapStart: UInt64 = 0x10_0000

    struct Ring {
        var size: UInt16
        var desc: UInt64
        var avail: UInt64
        var used: UInt64
        var nextDescriptor: UInt16 = 0
        var availIdx: UInt16 = 0
        var lastUsed: UInt16 = 0
    }

    struct Posted {
        var head: UInt16
        /// Device-writable buffers, in order.
        var writable: [GuestBuffer]
    }

    let memory: GuestMemory
    let transport: VirtioMMIOTransport
    let recorder: VirtioRecorder
    var rings: [Int: Ring] = [:]
    var heap = VirtioTestGuest.heapStart

    init(_ device: any VirtioDevice, recorder: VirtioRecorder = VirtioRecorder(), ramSize: UInt64 = VirtioTestGuest.ramSize) throws {
        memory = try GuestMemory(size: ramSize)
        self.recorder = recorder
        transport = VirtioMMIOTransport(device: device, memory: memory, interrupt: recorder.line, log: recorder.log)
    }

    // MARK: Registers

    func reg(_ offset: UInt64) -> UInt32 { UInt32(truncatingIfNeeded: transport.mmioRead(offset: offset, size: 4)) }
    func setReg(_ offset: UInt64, _ value: UInt32) { transport.mmioWrite(offset: offset, size: 4, value: UInt64(value)) }
    var status: UInt8 { UInt8(truncatingIfNeeded: reg(Reg.status)) }
    func setStatus(_ s: UInt8) { setReg(Reg.status, UInt32(s)) }

    var deviceFeatures: UInt64 {
        setReg(Reg.deviceFeaturesSel, 0)
        let low = UInt64(reg(Reg.deviceFeatures))
        setReg(Reg.deviceFeaturesSel, 1)
        return low | UInt64(reg(Reg.deviceFeatures)) << 32
    }

    func writeDriverFeatures(_ f: UInt64) {
        setReg(Reg.driverFeaturesSel, 0)
        setReg(Reg.driverFeatures, UInt32(truncatingIfNeeded: f))
        setReg(Reg.driverFeaturesSel, 1)
        setReg(Reg.driverFeatures, UInt32(truncatingIfNeeded: f >> 32))
    }

    /// ACKNOWLEDGE, DRIVER, features, FEATURES_OK; returns whether FEATURES_OK stuck.
    @discardableResult
    func negotiate(_ features: UInt64? = nil) -> Bool {
        setStatus(VirtioStatus.acknowledge)
        setStatus(VirtioStatus.acknowledge | VirtioStatus.driver)
        writeDriverFeatures(features ?? deviceFeatures)
        setStatus(VirtioStatus.acknowledge | VirtioStatus.driver | VirtioStatus.featuresOK)
        return status & VirtioStatus.featuresOK != 0
    }

    /// Lays out queue `index` and writes its registers (QueueReady last).
    func setUpQueue(_ index: Int, size: UInt16? = nil) {
        setReg(Reg.queueSel, UInt32(index))
        let n = size ?? UInt16(reg(Reg.queueNumMax))
        let base = 0x10000 * UInt64(index + 1)
        let ring = Ring(size: n, desc: base, avail: base + 16 * UInt64(n), used: base + 0x8000)
        try? memory.fill(0, at: base, count: 0x10000)
        setReg(Reg.queueNum, UInt32(n))
        setReg(Reg.queueDescLow, UInt32(truncatingIfNeeded: ring.desc)); setReg(Reg.queueDescHigh, UInt32(ring.desc >> 32))
        setReg(Reg.queueDriverLow, UInt32(truncatingIfNeeded: ring.avail)); setReg(Reg.queueDriverHigh, UInt32(ring.avail >> 32))
        setReg(Reg.queueDeviceLow, UInt32(truncatingIfNeeded: ring.used)); setReg(Reg.queueDeviceHigh, UInt32(ring.used >> 32))
        setReg(Reg.queueReady, 1)
        rings[index] = ring
    }

    /// Full initialisation: negotiate, set up `queues`, DRIVER_OK.
    func start(queues: Int, size: UInt16? = nil) {
        let ok = negotiate()
        precondition(ok, "negotiation failed")
        for q in 0..<queues { setUpQueue(q, size: size) }
        setStatus(VirtioStatus.acknowledge | VirtioStatus.driver | VirtioStatus.featuresOK | VirtioStatus.driverOK)
    }

    /// Status ← 0 and forget the rings.
    func reset() {
        setStatus(0)
        rings = [:]
        heap = Self.heapStart
    }

    // MARK: Buffers and rings

    func alloc(_ n: Int) -> UInt64 {
        let at = heap
        heap += UInt64((n + 15) & ~15)
        precondition(heap < memory.size, "test heap exhausted")
        return at
    }

    func writeDescriptor(_ q: Int, index: UInt16, address: UInt64, length: UInt32, flags: UInt16, next: UInt16) {
        let ring = rings[q]!
        let entry = ring.desc + 16 * UInt64(index)
        try! memory.store(address, at: entry)
        try! memory.store(length, at: entry + 8)
        try! memory.store(flags, at: entry + 12)
        try! memory.store(next, at: entry + 14)
    }

    /// Puts `head` into the available ring and bumps avail idx (by `idxStep`).
    func publish(_ q: Int, head: UInt16, idxStep: UInt16 = 1) {
        var ring = rings[q]!
        try! memory.store(head, at: ring.avail + 4 + 2 * UInt64(ring.availIdx % ring.size))
        ring.availIdx &+= idxStep
        try! memory.store(ring.availIdx, at: ring.avail + 2)
        rings[q] = ring
    }

    /// Builds a chain of fresh buffers: `readable` (contents given) then `writable` (sizes
    /// given, zero-filled), publishes it.
    @discardableResult
    func post(_ q: Int, readable: [[UInt8]] = [], writable: [Int] = [], publish doPublish: Bool = true) -> Posted {
        var ring = rings[q]!
        let parts: [(UInt64, Int, Bool)] = readable.map { data in
            let a = alloc(data.count)
            try! memory.write(data, at: a)
            return (a, data.count, false)
        } + writable.map { n in
            let a = alloc(n)
            try! memory.fill(0xEE, at: a, count: n)
            return (a, n, true)
        }
        let head = ring.nextDescriptor
        for (i, (address, length, isWritable)) in parts.enumerated() {
            let index = (head &+ UInt16(i)) % ring.size
            let last = i == parts.count - 1
            writeDescriptor(q, index: index, address: address, length: UInt32(length),
                            flags: (isWritable ? VirtqDescriptorFlag.write : 0) | (last ? 0 : VirtqDescriptorFlag.next),
                            next: (index &+ 1) % ring.size)
        }
        ring.nextDescriptor = (head &+ UInt16(parts.count)) % ring.size
        rings[q] = ring
        if doPublish { publish(q, head: head) }
        return Posted(head: head, writable: parts.filter { $0.2 }.map { GuestBuffer(address: $0.0, length: $0.1) })
    }

    func notify(_ q: Int) { setReg(Reg.queueNotify, UInt32(q)) }

    /// Used entries the device added since the last call.
    func takeUsed(_ q: Int) -> [(id: UInt32, length: UInt32)] {
        var ring = rings[q]!
        let idx: UInt16 = try! memory.load(at: ring.used + 2)
        var out: [(UInt32, UInt32)] = []
        while ring.lastUsed != idx {
            let e = ring.used + 4 + 8 * UInt64(ring.lastUsed % ring.size)
            out.append((try! memory.load(at: e), try! memory.load(at: e + 4)))
            ring.lastUsed &+= 1
        }
        rings[q] = ring
        return out
    }

    func bytes(_ b: GuestBuffer) -> [UInt8] { try! memory.read(at: b.address, count: b.length) }

    func ackInterrupts() {
        setReg(Reg.interruptACK, reg(Reg.interruptStatus))
    }
}

/// A temporary file that removes itself.
final class VirtioTempFile {
    let path: String

    init(size: Int, fill: (Int) -> UInt8 = { _ in 0 }) {
        var template = Array("/tmp/swiftvisor-virtio-XXXXXX".utf8CString)
        let fd = template.withUnsafeMutableBufferPointer { mkstemp($0.baseAddress!) }
        precondition(fd >= 0, "mkstemp failed")
        path = String(decoding: template.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
        let bytes = (0..<size).map(fill)
        if !bytes.isEmpty { _ = bytes.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) } }
        close(fd)
    }

    func contents() -> [UInt8] {
        let fd = open(path, O_RDONLY)
        defer { close(fd) }
        var st = stat()
        fstat(fd, &st)
        var out = [UInt8](repeating: 0, count: Int(st.st_size))
        _ = out.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
        return out
    }

    deinit { unlink(path) }
}
