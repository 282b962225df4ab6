import Testing
import VirtCore
@testable import Devices
#if canImport(Glibc)
import Glibc
#endif

/// A virtio-blk request header: type, reserved, sector.
func virtioBlockHeader(_ type: UInt32, sector: UInt64 = 0) -> [UInt8] {
    var h: [UInt8] = []
    withUnsafeBytes(of: type.littleEndian) { h += $0 }
    h += [0, 0, 0, 0]
    withUnsafeBytes(of: sector.littleEndian) { h += $0 }
    return h
}

enum BlockType {
    static let read: UInt32 = 0, write: UInt32 = 1, flush: UInt32 = 4, getID: UInt32 = 8, discard: UInt32 = 11
}

@Suite struct VirtioBlockTests {
    static let sectors = 64

    func makeDisk(readOnly: Bool = false) throws -> (VirtioTempFile, VirtioBlock, VirtioTestGuest) {
        let file = VirtioTempFile(size: Self.sectors * 512) { UInt8(truncatingIfNeeded: $0 / 512) }
        let blk = try VirtioBlock(path: file.path, readOnly: readOnly, serial: "swiftvisor-disk-0")
        let g = try VirtioTestGuest(blk)
        g.start(queues: 1)
        return (file, blk, g)
    }

    @Test func offersFeaturesAndReportsCapacity() throws {
        let (_, blk, g) = try makeDisk()
        #expect(g.status & VirtioStatus.driverOK != 0)
        #expect(g.reg(Reg.deviceID) == 2)
        #expect(g.transport.offeredFeatures == VirtioFeature.version1 | VirtioBlock.featureSegMax
            | VirtioBlock.featureBlockSize | VirtioBlock.featureFlush)
        #expect(g.transport.mmioRead(offset: 0x100, size: 4) == UInt64(Self.sectors))
        #expect(g.transport.mmioRead(offset: 0x104, size: 4) == 0)
        #expect(g.transport.mmioRead(offset: 0x10C, size: 4) == 254)  // seg_max
        #expect(g.transport.mmioRead(offset: 0x114, size: 4) == 512)  // blk_size
        #expect(blk.capacity == UInt64(Self.sectors))
    }

    @Test func writtenSectorsReachTheFileAndReadBack() throws {
        let (file, blk, g) = try makeDisk()
        let data = (0..<1024).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ 1) }
        // Header and data split oddly across descriptors.
        let w = g.post(0, readable: [virtioBlockHeader(BlockType.write, sector: 3), Array(data[0..<300]), Array(data[300...])],
                       writable: [1])
        g.notify(0)
        #expect(g.takeUsed(0).map { [$0.id, $0.length] } == [[UInt32(w.head), 1]])
        #expect(g.bytes(w.writable[0]) == [0])
        let disk = file.contents()
        #expect(Array(disk[1536..<2560]) == data)
        #expect(disk[1535] == 2 && disk[2560] == 5)  // neighbours untouched

        // Read back into three buffers, the status byte in its own descriptor.
        let r = g.post(0, readable: [virtioBlockHeader(BlockType.read, sector: 3)], writable: [512, 511, 1, 1])
        g.notify(0)
        #expect(g.takeUsed(0).map { [$0.id, $0.length] } == [[UInt32(r.head), 1025]])
        #expect(r.writable[0..<3].flatMap { g.bytes($0) } == data)
        #expect(g.bytes(r.writable[3]) == [0])
        #expect(g.reg(Reg.interruptStatus) & VirtioInterrupt.usedBuffer != 0)

        // Status sharing a descriptor with the data.
        let r2 = g.post(0, readable: [virtioBlockHeader(BlockType.read, sector: 10)], writable: [513])
        g.notify(0)
        #expect(g.bytes(r2.writable[0]) == [UInt8](repeating: 10, count: 512) + [0])

        let stats = blk.statistics
        #expect(stats.writes == 1 && stats.reads == 2 && stats.bytesWritten == 1024 && stats.bytesRead == 1536)
        #expect(g.transport.diagnostics.errorCount == 0)
    }

    @Test func flushAndGetID() throws {
        let (_, blk, g) = try makeDisk()
        let f = g.post(0, readable: [virtioBlockHeader(BlockType.flush)], writable: [1])
        let id = g.post(0, readable: [virtioBlockHeader(BlockType.getID)], writable: [20, 1])
        g.notify(0)
        #expect(g.takeUsed(0).map(\.length) == [1, 21])
        #expect(g.bytes(f.writable[0]) == [0])
        #expect(g.bytes(id.writable[0]) == Array("swiftvisor-disk-0".utf8) + [0, 0, 0])
        #expect(g.bytes(id.writable[1]) == [0])
        #expect(blk.statistics.flushes == 1)
    }

    @Test func readOnlyImagesRefuseWrites() throws {
        let (file, blk, g) = try makeDisk(readOnly: true)
        #expect(g.transport.offeredFeatures & VirtioBlock.featureReadOnly != 0)
        let before = file.contents()
        let w = g.post(0, readable: [virtioBlockHeader(BlockType.write, sector: 0), [UInt8](repeating: 0xAB, count: 512)], writable: [1])
        g.notify(0)
        #expect(g.bytes(w.writable[0]) == [1])  // IOERR
        #expect(file.contents() == before)
        let r = g.post(0, readable: [virtioBlockHeader(BlockType.read, sector: 1)], writable: [512, 1])
        let f = g.post(0, readable: [virtioBlockHeader(BlockType.flush)], writable: [1])
        g.notify(0)
        #expect(g.bytes(r.writable[0]) == [UInt8](repeating: 1, count: 512))
        #expect(g.bytes(r.writable[1]) == [0])
        #expect(g.bytes(f.writable[0]) == [0])
        #expect(blk.statistics.failedRequests == 1)
        #expect(g.transport.diagnostics.count(of: "blockWriteReadOnly") == 1)
    }

    @Test func outOfRangeAndMalformedRequestsFail() throws {
        let (file, _, g) = try makeDisk()
        let before = file.contents()
        let cases: [(UInt32, UInt64, [UInt8], [Int], UInt8)] = [
            (BlockType.read, 64, [], [512, 1], 1),                     // just past the end
            (BlockType.read, 63, [], [1024, 1], 1),                    // runs past the end
            (BlockType.read, UInt64.max, [], [512, 1], 1),             // sector * 512 would overflow
            (BlockType.write, 1 << 55, [UInt8](repeating: 1, count: 512), [1], 1),
            (BlockType.read, 0, [], [100, 1], 1),                      // not a multiple of 512
            (BlockType.discard, 0, [], [1], 2),                        // UNSUPP
            (0xDEAD, 0, [], [1], 2),
        ]
        var posted: [VirtioTestGuest.Posted] = []
        for (type, sector, data, writable, _) in cases {
            posted.append(g.post(0, readable: [virtioBlockHeader(type, sector: sector)] + (data.isEmpty ? [] : [data]), writable: writable))
        }
        g.notify(0)
        #expect(g.takeUsed(0).map(\.length) == [UInt32](repeating: 1, count: cases.count))
        for (p, c) in zip(posted, cases) { #expect(g.bytes(p.writable.last!).last == c.4) }
        #expect(file.contents() == before)
        #expect(g.transport.diagnostics.count(of: "blockOutOfRange") == 4)
        #expect(g.status & VirtioStatus.deviceNeedsReset == 0)

        // A header shorter than 16 bytes; a request with no writable status byte.
        let short = g.post(0, readable: [[0, 0, 0, 0, 0, 0, 0, 0]], writable: [1])
        g.post(0, readable: [virtioBlockHeader(BlockType.read)])
        g.notify(0)
        #expect(g.takeUsed(0).map(\.length) == [1, 0])
        #expect(g.bytes(short.writable[0]) == [1])
        #expect(g.transport.diagnostics.count(of: "blockShortHeader") == 1)
        #expect(g.transport.diagnostics.count(of: "blockNoStatus") == 1)

        // Still healthy.
        let ok = g.post(0, readable: [virtioBlockHeader(BlockType.read, sector: 63)], writable: [512, 1])
        g.notify(0)
        #expect(g.bytes(ok.writable[0]) == [UInt8](repeating: 63, count: 512))
        #expect(g.bytes(ok.writable[1]) == [0])
    }

    @Test func openingProblemsAreExplained() throws {
        #expect(throws: VirtioBlockError.fileNotFound(path: "/nonexistent/disk.img")) {
            try VirtioBlock(path: "/nonexistent/disk.img")
        }
        let odd = VirtioTempFile(size: 1000)
        #expect(throws: VirtioBlockError.sizeNotSectorMultiple(path: odd.path, size: 1000)) {
            try VirtioBlock(path: odd.path)
        }
        let empty = VirtioTempFile(size: 0)
        #expect(throws: VirtioBlockError.emptyImage(path: empty.path)) { try VirtioBlock(path: empty.path) }
        #expect(throws: VirtioBlockError.notARegularFile(path: "/tmp")) { try VirtioBlock(path: "/tmp", readOnly: true) }

        // Two writers on one image: the second is told who holds it.
        let shared = VirtioTempFile(size: 4096)
        let first = try VirtioBlock(path: shared.path)
        #expect(throws: VirtioBlockError.inUse(path: shared.path)) { try VirtioBlock(path: shared.path) }
        _ = first

        let message = VirtioBlockError.sizeNotSectorMultiple(path: "/x.img", size: 1000).description
        #expect(message.contains("truncate -s %512 /x.img"))
        #expect(VirtioBlockError.permissionDenied(path: "/x.img", readOnly: false).description.contains("read-only"))
    }

    @Test(.enabled(if: getuid() != 0, "root bypasses file permissions, so EACCES cannot be provoked"))
    func unreadableImagesReportPermission() throws {
        let file = VirtioTempFile(size: 4096)
        chmod(file.path, 0o400)
        #expect(throws: VirtioBlockError.permissionDenied(path: file.path, readOnly: false)) { try VirtioBlock(path: file.path) }
        _ = try VirtioBlock(path: file.path, readOnly: true)
    }
}
