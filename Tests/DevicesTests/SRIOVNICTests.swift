import Testing
import VirtCore
@testable import Devices

/// The SR-IOV NIC driven directly, as a (possibly hostile) VF driver would.
@Suite struct SRIOVNICTests {
    /// Two VMs' RAM at host-physical 4 and 8 GiB, VF i in domain i+1 mapping its VM's RAM.
    struct Rig {
        let nic: SRIOVNIC
        let iommu: IOMMU
        let vms: [GuestMemory]
        static let page: UInt64 = 0x5E000, tx: UInt64 = 0x10000, rx: UInt64 = 0x11000, buffers: UInt64 = 0x20000

        init(vfs: Int = 2) throws {
            let iommu = IOMMU(), space = HostPhysicalSpace()
            nic = SRIOVNIC(physicalFunction: RequesterID(bus: 1, device: 0, function: 0), totalVirtualFunctions: 4) { r in
                DeviceDMA(requester: r, iommu: iommu, space: space)
            }
            try nic.enableVirtualFunctions(vfs)
            var vms: [GuestMemory] = []
            for i in 0..<vfs {
                let m = try GuestMemory(size: 2 << 20)
                let base = UInt64(i + 1) << 32
                try space.add(m, at: base, owner: .virtualMachine("vm\(i)"))
                try iommu.createDomain(UInt16(i + 1))
                try iommu.updateDomain(UInt16(i + 1)) { t throws(IOPageTableError) in
                    try t.mapRange(iova: 0, to: base, length: 2 << 20, page: .size2M, permissions: .readWrite)
                }
                try iommu.attach(nic.requester(ofVF: i)!, to: UInt16(i + 1))
                try nic.assign(vf: i, registers: m, at: Self.page, dmaBase: 0)
                vms.append(m)
            }
            self.iommu = iommu
            self.vms = vms
        }

        func reg(_ vf: Int, _ offset: UInt64) throws -> UInt32 { try vms[vf].load(UInt32.self, at: Self.page + offset) }
        func setReg(_ vf: Int, _ offset: UInt64, _ v: UInt32) throws { try vms[vf].store(v, at: Self.page + offset) }

        /// Rings at fixed addresses, `size` entries, enabled.
        func open(_ vf: Int, size: UInt32 = 8) throws {
            try vms[vf].store(Self.tx, at: Self.page + VFRegister.txRing)
            try vms[vf].store(Self.rx, at: Self.page + VFRegister.rxRing)
            try setReg(vf, VFRegister.ringSize, size)
            try setReg(vf, VFRegister.enable, 1)
            nic.service()
        }

        func descriptor(_ vf: Int, ring: UInt64, _ slot: UInt64, address: UInt64, length: UInt32) throws {
            try vms[vf].store(address, at: ring + 16 * slot)
            try vms[vf].store(length, at: ring + 16 * slot + 8)
            try vms[vf].store(UInt16(0), at: ring + 16 * slot + 12)
        }

        func status(_ vf: Int, ring: UInt64, _ slot: UInt64) throws -> UInt16 { try vms[vf].load(UInt16.self, at: ring + 16 * slot + 12) }

        /// A frame to `vf`'s MAC with `fill` as payload.
        func frame(to vf: Int, fill: UInt8, length: Int = 64) -> [UInt8] {
            let mac = nic.mac(ofVF: vf)!
            return (0..<6).map { UInt8(truncatingIfNeeded: mac >> (8 * UInt64($0))) } + [UInt8](repeating: fill, count: length - 6)
        }
    }

    @Test func framesAreSwitchedByMACAndDroppedWithoutBuffers() throws {
        let rig = try Rig()
        try rig.open(0)
        try rig.open(1)
        // VF 1 posts one receive buffer; VF 0 sends two frames to it.
        try rig.descriptor(1, ring: Rig.rx, 0, address: Rig.buffers, length: 2048)
        try rig.setReg(1, VFRegister.rxTail, 1)
        try rig.vms[0].write(rig.frame(to: 1, fill: 0xAB), at: Rig.buffers)
        try rig.descriptor(0, ring: Rig.tx, 0, address: Rig.buffers, length: 64)
        try rig.descriptor(0, ring: Rig.tx, 1, address: Rig.buffers, length: 64)
        try rig.setReg(0, VFRegister.txTail, 2)
        #expect(rig.nic.service() == 2)
        #expect(try rig.reg(0, VFRegister.txHead) == 2)
        #expect(try rig.status(0, ring: Rig.tx, 0) == VFRegister.statusDone)
        #expect(try rig.reg(1, VFRegister.rxHead) == 1)
        #expect(try rig.vms[1].read(at: Rig.buffers + 6, count: 4) == [0xAB, 0xAB, 0xAB, 0xAB])
        #expect(try rig.vms[1].load(UInt32.self, at: Rig.rx + 8) == 64)  // received length written back
        #expect(try rig.reg(1, VFRegister.rxDropped) == 1)             // the second had no buffer
        #expect(rig.nic.counters(ofVF: 1)?.framesReceived == 1)
    }

    @Test func hostileRingsAndLengthsFailCleanly() throws {
        let rig = try Rig()
        // A ring size that is not a power of two: the VF refuses to start.
        try rig.open(0, size: 6)
        #expect(try rig.reg(0, VFRegister.ringFault) == 1)
        try rig.setReg(0, VFRegister.enable, 0)
        rig.nic.service()
        try rig.open(0)
        #expect(try rig.reg(0, VFRegister.ringFault) == 0)
        // Too short, too long, and outside the domain: each a DMA error, the VF carries on.
        try rig.descriptor(0, ring: Rig.tx, 0, address: Rig.buffers, length: 3)
        try rig.descriptor(0, ring: Rig.tx, 1, address: Rig.buffers, length: 1 << 20)
        try rig.descriptor(0, ring: Rig.tx, 2, address: 3 << 30, length: 64)
        try rig.setReg(0, VFRegister.txTail, 3)
        rig.nic.service()
        for slot in 0..<3 { #expect(try rig.status(0, ring: Rig.tx, UInt64(slot)) == VFRegister.statusDone | VFRegister.statusDMAError) }
        #expect(try rig.reg(0, VFRegister.txErrors) == 3)
        #expect(rig.iommu.faultLog.faults.map(\.iova) == [3 << 30])
        // A tail far ahead of the ring: at most the per-pass budget each pass.
        try rig.setReg(0, VFRegister.txTail, 3 + 1000)
        #expect(rig.nic.service(budgetPerVF: 64) == 64)
        // A ring moved outside the domain: the VF stops with ring_fault, nothing else breaks.
        try rig.setReg(0, VFRegister.enable, 0)
        rig.nic.service()
        try rig.vms[0].store(UInt64(5) << 32, at: Rig.page + VFRegister.txRing)
        try rig.setReg(0, VFRegister.enable, 1)
        try rig.setReg(0, VFRegister.txTail, 1)
        rig.nic.service()
        #expect(try rig.reg(0, VFRegister.ringFault) == 1)
        #expect(rig.nic.service() == 0)
    }

    @Test func assignmentIsCheckedAndBroadcastReachesEveryOtherVF() throws {
        let rig = try Rig()
        #expect(throws: SRIOVError.alreadyAssigned(0)) { try rig.nic.assign(vf: 0, registers: rig.vms[0], at: Rig.page, dmaBase: 0) }
        #expect(throws: SRIOVError.noSuchVirtualFunction(5)) { try rig.nic.assign(vf: 5, registers: rig.vms[0], at: Rig.page, dmaBase: 0) }
        #expect(throws: SRIOVError.registerPageOutsideRAM(0x123)) {
            try SRIOVNIC(physicalFunction: rig.nic.physicalFunction, totalVirtualFunctions: 1) { _ in fatalError("no DMA") }
                .assignAfterEnabling(registers: rig.vms[0], at: 0x123)
        }
        #expect(throws: SRIOVError.tooManyVirtualFunctions(requested: 5, total: 4)) { try rig.nic.enableVirtualFunctions(5) }
        try rig.open(0)
        try rig.open(1)
        try rig.descriptor(1, ring: Rig.rx, 0, address: Rig.buffers, length: 2048)
        try rig.setReg(1, VFRegister.rxTail, 1)
        try rig.vms[0].write([UInt8](repeating: 0xFF, count: 6) + [UInt8](repeating: 7, count: 58), at: Rig.buffers)
        try rig.descriptor(0, ring: Rig.tx, 0, address: Rig.buffers, length: 64)
        try rig.setReg(0, VFRegister.txTail, 1)
        rig.nic.service()
        #expect(try rig.reg(1, VFRegister.rxHead) == 1)
        #expect(rig.nic.counters(ofVF: 0)?.framesReceived == 0)  // a broadcast does not come back
    }
}

extension SRIOVNIC {
    /// One VF enabled, then assigned at `address` (for the register-page check).
    func assignAfterEnabling(registers: GuestMemory, at address: UInt64) throws {
        try enableVirtualFunctions(1)
        try assign(vf: 0, registers: registers, at: address, dmaBase: 0)
    }
}
