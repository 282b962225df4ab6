import Foundation
import TestSupport
import Testing
import VirtCore
@testable import VMM
#if canImport(Glibc)
import Glibc
#endif

/// Where a snapshot may be written, and what a snapshot may claim.
@Suite struct SnapshotTargetTests {
    static let metadata = SnapshotMetadata(engine: "software", memorySize: 4 * 4096, vcpuCount: 1)

    static func write(to path: String) throws {
        try SnapshotWriter.write(to: path, metadata: metadata, vcpus: [VCPUState()], devices: [], pageCount: 4) { i, buffer in
            buffer.storeBytes(of: UInt64(i), as: UInt64.self)
        }
    }

    /// A FIFO (like a character device) is refused and stays what it was; no temporary file is left.
    @Test func specialFileTargetIsRefused() throws {
        let dir = ScratchDirectory()
        let fifo = dir.file("pipe")
        #expect(mkfifo(fifo, 0o600) == 0)
        #expect(throws: SnapshotError.notARegularFile(path: fifo)) { try Self.write(to: fifo) }
        var st = stat()
        #expect(lstat(fifo, &st) == 0 && st.st_mode & S_IFMT == S_IFIFO)
        #expect(dir.contents == ["pipe"])
        #expect(throws: SnapshotError.notARegularFile(path: dir.path)) { try Self.write(to: dir.path) }
        #expect(ProcessLifecycle.registeredPaths.allSatisfy { !$0.hasPrefix(dir.path) })
    }

    /// New files and regular files are written (the latter replaced whole).
    @Test func newAndRegularTargetsAreWritten() throws {
        let dir = ScratchDirectory()
        let path = dir.file("vm.snap")
        try Self.write(to: path)
        try "old".write(toFile: path, atomically: false, encoding: .utf8)
        try Self.write(to: path)
        #expect(try SnapshotFile(path: path).pageCount == 4)
        #expect(dir.contents == ["vm.snap"])
    }

    /// A (sparse) file whose tables claim 1 TiB of guest memory is refused at once, before
    /// anything of that size is read.
    @Test func absurdMemorySizeIsRefusedAtOnce() throws {
        let dir = ScratchDirectory()
        let path = dir.file("huge.snap")
        try Self.write(to: path)
        let file = try SnapshotFile(path: path)
        let tera: UInt64 = 1 << 40
        var sections = file.sections
        let memoryIndex = try #require(sections.firstIndex { $0.kind == .memory })
        sections[memoryIndex].length = tera
        let tableOffset = sections[memoryIndex].offset + tera
        let table = SnapshotSectionEntry.encode(sections)
        let header = SnapshotHeader(sectionCount: UInt32(sections.count), sectionTableOffset: tableOffset,
                                    fileSize: tableOffset + UInt64(table.count), sectionTableCRC: SnapshotCRC32C.checksum(table))
        let fd = open(path, O_WRONLY)
        #expect(fd >= 0)
        defer { close(fd) }
        let headerBytes = header.encoded(), tableBytes = table
        #expect(headerBytes.withUnsafeBytes { pwrite(fd, $0.baseAddress, $0.count, 0) } == headerBytes.count)
        #expect(tableBytes.withUnsafeBytes { pwrite(fd, $0.baseAddress, $0.count, off_t(tableOffset)) } == tableBytes.count)
        #expect(throws: SnapshotError.implausibleMemorySize(tera)) { try SnapshotFile.inspection(path: path) }
        #expect(SnapshotError.implausibleMemorySize(tera).description.hasPrefix("snapshot claims 1024G of guest memory"))
    }
}
