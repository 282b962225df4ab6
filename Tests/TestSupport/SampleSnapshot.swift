import VirtCore
import VMM

/// Writes a small, valid snapshot file (one vCPU, no devices, `pages` pages of a seeded
/// pattern) with the real writer; returns the file offset of its guest memory, for tests
/// that damage it.
@discardableResult
public func writeSampleSnapshot(path: String, pages: Int, seed: UInt64 = 1) throws -> UInt64 {
    let metadata = SnapshotMetadata(engine: "software", memorySize: UInt64(pages) * 4096, vcpuCount: 1)
    try SnapshotWriter.write(to: path, metadata: metadata, vcpus: [VCPUState()], devices: [], pageCount: pages) { i, buffer in
        var generator = SplitMix64(seed: seed &+ UInt64(i))
        for w in 0..<(buffer.count / 8) { buffer.storeBytes(of: generator.next(), toByteOffset: w * 8, as: UInt64.self) }
    }
    return try SnapshotFile(path: path).memoryOffset
}
