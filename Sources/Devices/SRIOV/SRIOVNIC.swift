import Synchronization
import VirtCore

/// The register page of one virtual function, as its driver sees it (Guests/runtime/vf.h).
///
/// The page is the VF's BAR mapped into the guest: ordinary guest RAM the driver reads and
/// writes without exits, the device polling it as hardware watches its doorbells. Rings
/// and buffers are elsewhere and reached only by DMA, through the VF's IOMMU domain.
public enum VFRegister {
    /// u64, device: the VF's MAC address (low 6 bytes, first byte lowest).
    public static let mac: UInt64 = 0x00
    /// u64, device: add to a guest-physical address to get the device address (0 behind
    /// an IOMMU whose domain maps guest-physical addresses; the host-physical base without).
    public static let dmaBase: UInt64 = 0x08
    /// u64, driver: device addresses of the transmit and receive descriptor rings.
    public static let txRing: UInt64 = 0x10, rxRing: UInt64 = 0x18
    /// u32, driver: entries per ring (power of two, at most `maxRingSize`).
    public static let ringSize: UInt64 = 0x20
    /// u32, driver: 1 starts the VF (rings latched, heads zeroed), 0 stops it.
    public static let enable: UInt64 = 0x24
    /// u32 free-running indexes: tails written by the driver, heads by the device.
    public static let txTail: UInt64 = 0x28, txHead: UInt64 = 0x2C
    public static let rxTail: UInt64 = 0x30, rxHead: UInt64 = 0x34
    /// u32, device: DMA faults on transmit and receive, frames dropped for want of buffers.
    public static let txErrors: UInt64 = 0x38, rxErrors: UInt64 = 0x3C, rxDropped: UInt64 = 0x40
    /// u32, device: which VF this is.
    public static let vfIndex: UInt64 = 0x44
    /// u32, device: 1 once the VF stopped because a ring was unreachable.
    public static let ringFault: UInt64 = 0x48

    public static let maxRingSize: UInt32 = 4096
    /// Descriptor: u64 address, u32 length, u16 status (device), u16 reserved.
    public static let descriptorSize: UInt64 = 16
    public static let statusDone: UInt16 = 1, statusDMAError: UInt16 = 2, statusTruncated: UInt16 = 4
    public static let maxFrameBytes = 65535
}

public enum SRIOVError: Error, Equatable, Sendable, CustomStringConvertible {
    case tooManyVirtualFunctions(requested: Int, total: Int)
    case noSuchVirtualFunction(Int)
    case alreadyAssigned(Int)
    case registerPageOutsideRAM(UInt64)

    public var description: String {
        switch self {
        case let .tooManyVirtualFunctions(n, total): return "\(n) virtual functions requested, the device has \(total)"
        case let .noSuchVirtualFunction(i): return "virtual function \(i) is not enabled"
        case let .alreadyAssigned(i): return "virtual function \(i) is already assigned"
        case let .registerPageOutsideRAM(gpa): return "VF register page 0x\(String(gpa, radix: 16)) is not a page of guest RAM"
        }
    }
}

/// What one VF did.
public struct VirtualFunctionCounters: Equatable, Sendable, Codable {
    public var framesSent: UInt64 = 0
    public var framesReceived: UInt64 = 0
    public var bytesSent: UInt64 = 0
    public var txDMAErrors: UInt64 = 0
    public var rxDMAErrors: UInt64 = 0
    public var rxDropped: UInt64 = 0
}

/// An SR-IOV NIC: a physical function whose SR-IOV capability creates up to
/// `totalVirtualFunctions` VFs, each with its own requester ID (PF + 1 + index: First VF
/// Offset 1, VF Stride 1), its own rings and its own IOMMU domain. The device's embedded
/// switch forwards frames between VFs by destination MAC (broadcast to all others).
public final class SRIOVNIC: Sendable {
    public let physicalFunction: RequesterID
    public let totalVirtualFunctions: Int

    private struct Function {
        var requester: RequesterID
        var mac: UInt64
        var page: (memory: GuestMemory, address: UInt64)?
        var enabled = false
        var faulted = false
        var txRing: UInt64 = 0, rxRing: UInt64 = 0, size: UInt32 = 0
        var txHead: UInt32 = 0, rxHead: UInt32 = 0
        var counters = VirtualFunctionCounters()
        /// Called after each receive completion (the VF's interrupt), under the NIC's lock.
        var onReceive: (@Sendable () -> Void)?
    }

    private let dma: @Sendable (RequesterID) -> DeviceDMA
    private let functions = Mutex<[Function]>([])
    public let unknownDestinationDrops = Atomic<UInt64>(0)

    /// - Parameter dma: the DMA path of a function (normally `DeviceDMA` through the platform's IOMMU).
    public init(physicalFunction: RequesterID, totalVirtualFunctions: Int, dma: @escaping @Sendable (RequesterID) -> DeviceDMA) {
        precondition(totalVirtualFunctions >= 1 && Int(physicalFunction.function) + totalVirtualFunctions <= 7,
                     "VFs are the functions after the PF's, up to 7")
        self.physicalFunction = physicalFunction
        self.totalVirtualFunctions = totalVirtualFunctions
        self.dma = dma
    }

    /// The SR-IOV capability's NumVFs + VF Enable: creates `count` VFs (0 removes them).
    public func enableVirtualFunctions(_ count: Int) throws(SRIOVError) {
        guard count >= 0, count <= totalVirtualFunctions else {
            throw .tooManyVirtualFunctions(requested: count, total: totalVirtualFunctions)
        }
        functions.withLock { list in
            list = (0..<count).map { i in
                Function(requester: RequesterID(bus: physicalFunction.bus, device: physicalFunction.device,
                                                function: physicalFunction.function + 1 + UInt8(i)),
                         mac: 0x0000_0000_0002 | UInt64(i + 1) << 40)
            }
        }
    }

    public var virtualFunctionCount: Int { functions.withLock { $0.count } }
    public func requester(ofVF index: Int) -> RequesterID? {
        functions.withLock { $0.indices.contains(index) ? $0[index].requester : nil }
    }
    /// The VF's MAC as a 48-bit number, first byte lowest (02:00:00:00:00:index+1).
    public func mac(ofVF index: Int) -> UInt64? { functions.withLock { $0.indices.contains(index) ? $0[index].mac : nil } }
    public func counters(ofVF index: Int) -> VirtualFunctionCounters? {
        functions.withLock { $0.indices.contains(index) ? $0[index].counters : nil }
    }

    /// Maps VF `index`'s registers into a guest at `address` (a page of its RAM) and
    /// publishes its MAC and DMA base there. `onReceive` runs after each frame the VF
    /// receives (it raises the VF's interrupt; it must not call back into the NIC).
    public func assign(vf index: Int, registers memory: GuestMemory, at address: UInt64, dmaBase: UInt64,
                       onReceive: (@Sendable () -> Void)? = nil) throws(SRIOVError) {
        guard address % 4096 == 0, memory.contains(address, length: 4096) else { throw .registerPageOutsideRAM(address) }
        try functions.withLock { (list: inout [Function]) throws(SRIOVError) in
            guard list.indices.contains(index) else { throw .noSuchVirtualFunction(index) }
            guard list[index].page == nil else { throw .alreadyAssigned(index) }
            list[index].page = (memory, address)
            list[index].onReceive = onReceive
            try? memory.fill(0, at: address, count: 4096)
            try? memory.store(list[index].mac, at: address + VFRegister.mac)
            try? memory.store(dmaBase, at: address + VFRegister.dmaBase)
            try? memory.store(UInt32(index), at: address + VFRegister.vfIndex)
        }
    }

    /// One pass of the device over every assigned VF: latches newly enabled rings, sends
    /// what the drivers queued (switching each frame to its destination VF). Returns the
    /// descriptors handled (0: idle).
    @discardableResult
    public func service(budgetPerVF: Int = 64) -> Int {
        functions.withLock { list in
            var work = 0
            for i in list.indices { work += serviceVF(i, &list, budget: budgetPerVF) }
            return work
        }
    }

    private func reg(_ f: Function, _ offset: UInt64) -> UInt32 {
        guard let p = f.page else { return 0 }
        return (try? p.memory.load(UInt32.self, at: p.address + offset)) ?? 0
    }

    private func setReg(_ f: Function, _ offset: UInt64, _ value: UInt32) {
        guard let p = f.page else { return }
        try? p.memory.store(value, at: p.address + offset)
    }

    private func serviceVF(_ i: Int, _ list: inout [Function], budget: Int) -> Int {
        guard let page = list[i].page else { return 0 }
        let wantEnabled = reg(list[i], VFRegister.enable) & 1 != 0
        if wantEnabled != list[i].enabled {
            list[i].enabled = wantEnabled
            list[i].faulted = false
            list[i].txHead = 0
            list[i].rxHead = 0
            if wantEnabled {
                list[i].txRing = (try? page.memory.load(UInt64.self, at: page.address + VFRegister.txRing)) ?? 0
                list[i].rxRing = (try? page.memory.load(UInt64.self, at: page.address + VFRegister.rxRing)) ?? 0
                let size = reg(list[i], VFRegister.ringSize)
                list[i].size = size > 0 && size <= VFRegister.maxRingSize && size & (size - 1) == 0 ? size : 0
                list[i].faulted = list[i].size == 0
            }
            setReg(list[i], VFRegister.txHead, 0)
            setReg(list[i], VFRegister.rxHead, 0)
            setReg(list[i], VFRegister.ringFault, list[i].faulted ? 1 : 0)
        }
        guard list[i].enabled, !list[i].faulted else { return 0 }
        let tail = reg(list[i], VFRegister.txTail)
        atomicMemoryFence(ordering: .acquiring)  // descriptors are written before the tail
        var done = 0
        while list[i].txHead != tail && done < budget {
            let f = list[i]
            let entry = f.txRing &+ UInt64(f.txHead & (f.size - 1)) &* VFRegister.descriptorSize
            let port = dma(f.requester)
            guard let address = try? port.load(UInt64.self, at: entry), let length = try? port.load(UInt32.self, at: entry + 8) else {
                stopOnRingFault(i, &list)
                return done
            }
            var status = VFRegister.statusDone
            if let frame = length >= 14 && Int(length) <= VFRegister.maxFrameBytes ? try? port.read(at: address, count: Int(length)) : nil {
                list[i].counters.framesSent += 1
                list[i].counters.bytesSent += UInt64(length)
                forward(frame, from: i, &list)
            } else {
                status |= VFRegister.statusDMAError
                list[i].counters.txDMAErrors += 1
                setReg(list[i], VFRegister.txErrors, UInt32(truncatingIfNeeded: list[i].counters.txDMAErrors))
            }
            guard (try? port.store(status, at: entry + 12)) != nil else {
                stopOnRingFault(i, &list)
                return done
            }
            list[i].txHead &+= 1
            atomicMemoryFence(ordering: .releasing)  // status before the head that publishes it
            setReg(list[i], VFRegister.txHead, list[i].txHead)
            done += 1
        }
        return done
    }

    private func stopOnRingFault(_ i: Int, _ list: inout [Function]) {
        list[i].faulted = true
        setReg(list[i], VFRegister.ringFault, 1)
    }

    /// The embedded switch: by destination MAC (the frame's first six bytes).
    private func forward(_ frame: [UInt8], from source: Int, _ list: inout [Function]) {
        var destination: UInt64 = 0
        for b in 0..<6 { destination |= UInt64(frame[b]) << (8 * UInt64(b)) }
        if destination == 0xFFFF_FFFF_FFFF {
            for j in list.indices where j != source { receive(frame, at: j, &list) }
        } else if let j = list.firstIndex(where: { $0.mac == destination && $0.page != nil }) {
            receive(frame, at: j, &list)
        } else {
            unknownDestinationDrops.add(1, ordering: .relaxed)
        }
    }

    private func receive(_ frame: [UInt8], at j: Int, _ list: inout [Function]) {
        let f = list[j]
        guard f.enabled, !f.faulted else { return }
        guard f.rxHead != reg(f, VFRegister.rxTail) else {
            list[j].counters.rxDropped += 1
            setReg(f, VFRegister.rxDropped, UInt32(truncatingIfNeeded: list[j].counters.rxDropped))
            return
        }
        let entry = f.rxRing &+ UInt64(f.rxHead & (f.size - 1)) &* VFRegister.descriptorSize
        let port = dma(f.requester)
        guard let address = try? port.load(UInt64.self, at: entry), let capacity = try? port.load(UInt32.self, at: entry + 8) else {
            stopOnRingFault(j, &list)
            return
        }
        let n = min(frame.count, Int(capacity))
        var status = VFRegister.statusDone
        if n < frame.count { status |= VFRegister.statusTruncated }
        if (try? port.write(frame[0..<n], at: address)) != nil {
            list[j].counters.framesReceived += 1
        } else {
            status |= VFRegister.statusDMAError
            list[j].counters.rxDMAErrors += 1
            setReg(f, VFRegister.rxErrors, UInt32(truncatingIfNeeded: list[j].counters.rxDMAErrors))
        }
        guard (try? port.store(UInt32(n), at: entry + 8)) != nil, (try? port.store(status, at: entry + 12)) != nil else {
            stopOnRingFault(j, &list)
            return
        }
        list[j].rxHead &+= 1
        atomicMemoryFence(ordering: .releasing)
        setReg(f, VFRegister.rxHead, list[j].rxHead)
        f.onReceive?()
    }
}
