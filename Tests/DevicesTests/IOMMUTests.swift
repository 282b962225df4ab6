import Synchronization
import Testing
import VirtCore
@testable import Devices

@Suite struct IOPageTableTests {
    @Test func walksFindEachPageSizeAndItsPermissions() throws {
        var t = IOPageTable()
        try t.map(iova: 0x1000, to: 0x5_0000_3000, page: .size4K, permissions: .read)
        try t.map(iova: 0x20_0000, to: 0x7_0000_0000, page: .size2M, permissions: .readWrite)
        try t.map(iova: 0x40_0000_0000, to: 0x8000_0000, page: .size1G, permissions: .write)
        let small = t.walk(0x1ABC)
        #expect(small.pageBase == 0x5_0000_3000 && small.page == .size4K && small.permissions == .read)
        #expect(small.entriesRead == 4)
        let mid = t.walk(0x3F_FFFF)
        #expect(mid.pageBase == 0x7_0000_0000 && mid.page == .size2M && mid.entriesRead == 3)
        let big = t.walk(0x40_1234_5678)
        #expect(big.pageBase == 0x8000_0000 && big.page == .size1G && big.permissions == .write && big.entriesRead == 2)
        #expect(t.walk(0x2000).pageBase == nil)
        #expect(t.walk(0x40_0000).pageBase == nil)
        #expect(t.mappedPages == [.size4K: 1, .size2M: 1, .size1G: 1])
    }

    @Test func refusesBadMappingsAndUnmaps() throws {
        var t = IOPageTable()
        #expect(throws: IOPageTableError.misaligned(iova: 0x1000, hpa: 0, page: .size2M)) {
            try t.map(iova: 0x1000, to: 0, page: .size2M, permissions: .read)
        }
        #expect(throws: IOPageTableError.beyondAddressWidth(iova: 1 << 48)) {
            try t.map(iova: 1 << 48, to: 0, page: .size4K, permissions: .read)
        }
        #expect(throws: IOPageTableError.noPermissions(iova: 0)) { try t.map(iova: 0, to: 0, page: .size4K, permissions: []) }
        try t.map(iova: 0x20_0000, to: 0, page: .size2M, permissions: .read)
        // A 4K page inside the 2M page, and the same 2M page twice, are refused.
        #expect(throws: IOPageTableError.alreadyMapped(iova: 0x20_1000)) {
            try t.map(iova: 0x20_1000, to: 0, page: .size4K, permissions: .read)
        }
        #expect(throws: IOPageTableError.alreadyMapped(iova: 0x20_0000)) {
            try t.map(iova: 0x20_0000, to: 0, page: .size2M, permissions: .read)
        }
        #expect(throws: IOPageTableError.notMapped(iova: 0x20_0000, page: .size4K)) { try t.unmap(iova: 0x20_0000, page: .size4K) }
        try t.unmap(iova: 0x20_0000, page: .size2M)
        #expect(t.walk(0x20_0000).pageBase == nil)
        try t.map(iova: 0x20_1000, to: 0x9000, page: .size4K, permissions: .read)
        #expect(t.walk(0x20_1FFF).pageBase == 0x9000)
    }
}

@Suite struct IOTLBTests {
    private func entry(_ n: UInt64, domain: UInt16 = 1) -> IOTLBEntry {
        IOTLBEntry(domain: domain, page: .size4K, pageNumber: n, hostBase: n << 12, permissions: .read)
    }

    @Test func lruEvictsTheLeastRecentlyUsed() {
        var tlb = IOTLB(capacity: 2, replacement: .lru)
        tlb.insert(entry(1)); tlb.insert(entry(2))
        #expect(tlb.lookup(domain: 1, iova: 0x1000) != nil)  // 1 is now more recent than 2
        tlb.insert(entry(3))
        #expect(tlb.lookup(domain: 1, iova: 0x2000) == nil)
        #expect(tlb.lookup(domain: 1, iova: 0x1000) != nil)
        #expect(tlb.lookup(domain: 2, iova: 0x1000) == nil)  // domains are separate
    }

    @Test func fifoEvictsTheOldestWhateverItsUse() {
        var tlb = IOTLB(capacity: 2, replacement: .fifo)
        tlb.insert(entry(1)); tlb.insert(entry(2))
        _ = tlb.lookup(domain: 1, iova: 0x1000)
        tlb.insert(entry(3))
        #expect(tlb.lookup(domain: 1, iova: 0x1000) == nil)
        #expect(tlb.lookup(domain: 1, iova: 0x2000) != nil)
    }

    @Test func invalidationDropsOnlyWhatMatches() {
        var tlb = IOTLB(capacity: 8, replacement: .random)
        for n in 1...4 { tlb.insert(entry(UInt64(n))) }
        tlb.insert(entry(1, domain: 2))
        #expect(tlb.invalidate { $0.domain == 1 && $0.pageNumber < 3 } == 2)
        #expect(tlb.count == 3)
        #expect(tlb.lookup(domain: 1, iova: 0x3000) != nil)
        #expect(tlb.lookup(domain: 2, iova: 0x1000) != nil)
    }
}

@Suite struct IOMMUTests {
    static let nic = RequesterID(bus: 1, device: 0, function: 1)

    /// VM memory at host-physical 4 GiB, VMM memory at 8 GiB; domain 1 maps IOVA [0, 2 MiB).
    private func setup(page: IOPageSize = .size4K, entries: Int = 16) throws -> (IOMMU, HostPhysicalSpace, GuestMemory, GuestMemory) {
        var config = IOMMUConfiguration()
        config.iotlbEntries = entries
        let iommu = IOMMU(configuration: config)
        let space = HostPhysicalSpace()
        let vm = try GuestMemory(size: 4 << 20)
        let vmm = try GuestMemory(size: 2 << 20)
        try space.add(vm, at: 4 << 30, owner: .virtualMachine("a"))
        try space.add(vmm, at: 8 << 30, owner: .vmm)
        try iommu.createDomain(1)
        try iommu.updateDomain(1) { t throws(IOPageTableError) in
            try t.mapRange(iova: 0, to: 4 << 30, length: 2 << 20, page: page, permissions: .readWrite)
        }
        try iommu.attach(Self.nic, to: 1)
        return (iommu, space, vm, vmm)
    }

    @Test func dmaLandsInTheDomainsMemoryAcrossPages() throws {
        let (iommu, space, vm, _) = try setup()
        let dma = DeviceDMA(requester: Self.nic, iommu: iommu, space: space)
        try dma.write([UInt8](repeating: 0xAB, count: 6000), at: 0x1F00)
        #expect(try vm.read(at: 0x1F00, count: 6000).allSatisfy { $0 == 0xAB })
        #expect(try dma.read(at: 0x2000, count: 4).allSatisfy { $0 == 0xAB })
        let c = iommu.counters
        #expect(c.translations == 4 && c.misses == 3 && c.hits == 1 && c.bytes == 6004)
    }

    @Test func outOfDomainDMAIsBlockedLoggedAndReported() throws {
        let (iommu, space, vm, vmm) = try setup()
        let reported = Mutex<[DMAFault]>([])
        iommu.setFaultHandler { f in reported.withLock { $0.append(f) } }
        let dma = DeviceDMA(requester: Self.nic, iommu: iommu, space: space)
        // The VMM's memory by its host-physical address, and past the domain's mapping.
        #expect(throws: DMAError.self) { try dma.write([1, 2, 3], at: 8 << 30) }
        #expect(throws: DMAError.self) { try dma.write([1, 2, 3], at: 0x20_0000) }
        // A write that starts mapped and runs off the end does nothing at all.
        #expect(throws: DMAError.self) { try dma.write([UInt8](repeating: 9, count: 8), at: 0x1F_FFFC) }
        #expect(try vm.load(UInt32.self, at: 0x1F_FFFC) == 0)
        #expect(try vmm.read(at: 0, count: 3) == [0, 0, 0])
        let log = iommu.faultLog.faults
        #expect(log.map(\.iova) == [8 << 30, 0x20_0000, 0x20_0000])
        #expect(log.allSatisfy { $0.reason == .pageNotPresent && $0.requester == Self.nic && $0.domain == 1 && $0.access == .write })
        #expect(reported.withLock { $0 } == log)
        // An unknown function has no context entry.
        let other = DeviceDMA(requester: RequesterID(bus: 1, device: 0, function: 2), iommu: iommu, space: space)
        #expect(throws: DMAError.translationFault(DMAFault(requester: other.requester, domain: nil, iova: 0, access: .read, reason: .contextNotPresent))) {
            _ = try other.read(at: 0, count: 1)
        }
    }

    @Test func withTheIOMMUOffTheSameDMAReachesTheVMM() throws {
        let (iommu, space, _, vmm) = try setup()
        iommu.isEnabled = false
        let dma = DeviceDMA(requester: Self.nic, iommu: iommu, space: space)
        try dma.write([1, 2, 3], at: 8 << 30)
        #expect(try vmm.read(at: 0, count: 3) == [1, 2, 3])
        #expect(iommu.faultLog.faults.isEmpty)
    }

    @Test func readOnlyMappingsRefuseWrites() throws {
        let (iommu, space, _, _) = try setup()
        try iommu.updateDomain(1) { t throws(IOPageTableError) in
            try t.map(iova: 0x100_0000, to: (4 << 30) + 0x30_0000, page: .size4K, permissions: .read)
        }
        let dma = DeviceDMA(requester: Self.nic, iommu: iommu, space: space)
        _ = try dma.read(at: 0x100_0000, count: 8)
        #expect(throws: DMAError.translationFault(DMAFault(requester: Self.nic, domain: 1, iova: 0x100_0000, access: .write, reason: .writeDenied))) {
            try dma.write([1], at: 0x100_0000)
        }
    }

    @Test func unmappingTakesEffectOnlyAfterInvalidation() throws {
        let (iommu, space, _, _) = try setup()
        let dma = DeviceDMA(requester: Self.nic, iommu: iommu, space: space)
        try dma.write([7], at: 0x5000)
        try iommu.updateDomain(1) { t throws(IOPageTableError) in try t.unmap(iova: 0x5000, page: .size4K) }
        // The stale IOTLB entry still translates: this is why the VMM must invalidate.
        try dma.write([8], at: 0x5000)
        #expect(iommu.invalidate(.pages(domain: 1, iova: 0x5000, length: 1)) == 1)
        #expect(throws: DMAError.self) { try dma.write([9], at: 0x5000) }
        // Detaching the function clears its context entry: every DMA faults, cached or not.
        try dma.write([1], at: 0x6000)
        #expect(iommu.domain(of: Self.nic) == 1 && iommu.iotlbCount == 1)
        iommu.detach(Self.nic)
        #expect(iommu.domain(of: Self.nic) == nil)
        #expect(throws: DMAError.translationFault(DMAFault(requester: Self.nic, domain: nil, iova: 0x6000, access: .write, reason: .contextNotPresent))) {
            try dma.write([1], at: 0x6000)
        }
        #expect(iommu.invalidate(.domain(1)) > 0 && iommu.iotlbCount == 0)
    }

    @Test func largePagesCutMissesForTheSameTraffic() throws {
        func misses(_ page: IOPageSize) throws -> UInt64 {
            let (iommu, space, _, _) = try setup(page: page, entries: 4)
            let dma = DeviceDMA(requester: Self.nic, iommu: iommu, space: space)
            for round in 0..<4 { for i in 0..<64 { try dma.write([UInt8(round)], at: UInt64(i) * 0x8000) } }
            return iommu.counters.misses
        }
        #expect(try misses(.size4K) == 256)  // 64 pages cycle through 4 entries: every access misses
        #expect(try misses(.size2M) == 1)
    }

    @Test func faultLogIsBoundedAndCountsWhatItLost() throws {
        var config = IOMMUConfiguration()
        config.faultLogCapacity = 2
        let iommu = IOMMU(configuration: config)
        for i in 0..<5 { _ = iommu.translate(Self.nic, iova: UInt64(i), length: 1, access: .read) }
        #expect(iommu.faultLog.faults.count == 2 && iommu.faultLog.lost == 3)
        #expect(iommu.counters.faults == 5)
        iommu.clearFaultLog()
        #expect(iommu.faultLog.faults.isEmpty)
    }

    @Test func virtioStyleBuffersStayInTheirVM() throws {
        let (iommu, space, vm, vmm) = try setup()
        let dma = DeviceDMA(requester: Self.nic, iommu: iommu, space: space)
        #expect(try dma.guestBuffers(iova: 0x1800, length: 0x1000, access: .read, in: vm) == [GuestBuffer(address: 0x1800, length: 0x1000)])
        iommu.isEnabled = false
        #expect(throws: DMAError.outsideOwnVM(hostAddress: 8 << 30, owner: .vmm)) {
            _ = try dma.guestBuffers(iova: 8 << 30, length: 16, access: .read, in: vm)
        }
        #expect(try dma.guestBuffers(iova: 8 << 30, length: 16, access: .read, in: vmm) == [GuestBuffer(address: 0, length: 16)])
    }
}

/// virtio's own path through the IOMMU: the queue translates every buffer.
@Suite struct VirtioThroughIOMMUTests {
    static let function = RequesterID(bus: 0, device: 3, function: 0)

    /// The fixture's 1 MiB at host-physical 0; the domain maps only its first 512 KiB.
    private func fixture() throws -> (VirtioQueueFixture, IOMMU) {
        var f = try VirtioQueueFixture()
        let iommu = IOMMU()
        let space = HostPhysicalSpace()
        try space.add(f.memory, at: 0, owner: .virtualMachine("guest"))
        try iommu.createDomain(7)
        try iommu.updateDomain(7) { t throws(IOPageTableError) in
            try t.mapRange(iova: 0, to: 0, length: 512 << 10, page: .size4K, permissions: .readWrite)
        }
        try iommu.attach(Self.function, to: 7)
        f.queue.dma = DeviceDMA(requester: Self.function, iommu: iommu, space: space)
        try f.queue.enable(in: f.memory)
        return (f, iommu)
    }

    @Test func buffersInsideTheDomainPass() throws {
        var (f, iommu) = try fixture()
        try f.descriptor(0, 0x7_E800, 0x1000, VirtioQueueTests.N, next: 1)
        try f.descriptor(1, 0x8000, 64, VirtioQueueTests.W)
        try f.offer([0])
        let chain = try #require(try f.queue.popAvailable(from: f.memory))
        #expect(chain.readable == [GuestBuffer(address: 0x7_E800, length: 0x1000)])
        #expect(chain.writable == [GuestBuffer(address: 0x8000, length: 64)])
        #expect(iommu.faultLog.faults.isEmpty && iommu.counters.translations >= 2)
    }

    @Test func aBufferInRAMButOutsideTheDomainFailsTheRequestAndIsLogged() throws {
        var (f, iommu) = try fixture()
        try f.descriptor(0, 0x9_0000, 512, VirtioQueueTests.W)
        try f.offer([0])
        #expect(throws: VirtqueueError.badRequest(head: 0, .bufferOutsideMemory(GuestBuffer(address: 0x9_0000, length: 512)), lastWritable: nil)) {
            _ = try f.queue.popAvailable(from: f.memory)
        }
        #expect(iommu.faultLog.faults.map(\.iova) == [0x9_0000])
        #expect(iommu.faultLog.faults.first?.access == .write)
    }

    @Test func ringsOutsideTheDomainCannotBeEnabled() throws {
        var (f, _) = try fixture()
        f.queue.reset()
        try f.queue.trySetAddress(.descriptorTable, 0x9_0000, checkAlignment: false)
        try f.queue.trySetAddress(.availableRing, VirtioQueueFixture.avail, checkAlignment: false)
        try f.queue.trySetAddress(.usedRing, VirtioQueueFixture.used, checkAlignment: false)
        #expect(throws: VirtqueueError.ringOutsideMemory(.descriptorTable, address: 0x9_0000, length: 128)) {
            try f.queue.enable(in: f.memory)
        }
    }
}
