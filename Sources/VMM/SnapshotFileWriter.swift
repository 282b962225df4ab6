import FoundationEssentials
import VirtCore
#if canImport(Glibc)
import Glibc
#endif

/// What `SnapshotWriter.write` did.
public struct SnapshotWriteReport: Sendable, Equatable {
    public var path: String
    /// Size of the snapshot file.
    public var bytesWritten: UInt64
    public var pageCount: Int
    /// Wall time from the start of the write to the directory fsync.
    public var seconds: Double

    public var bytesPerSecond: Double { seconds > 0 ? Double(bytesWritten) / seconds : 0 }
}

/// Writes snapshots in the format described in SnapshotFile.swift.
public enum SnapshotWriter {
    /// Bytes handed to each write(2).
    public static let bufferSize = 1 << 20
    /// `progress` is reported every this many pages (1 MiB), and once at the end.
    public static let progressInterval = 256

    /// Writes a snapshot to `path`, atomically: the file is built as `path.tmp-<pid>`,
    /// fsynced and renamed over `path` (then the directory is fsynced), so if anything
    /// fails — including `page` throwing — `path` keeps its previous contents and the
    /// temporary file is removed. The file is created with mode 0600 (guest RAM may hold
    /// secrets). One writer per path at a time within a process (they would share the
    /// temporary file).
    ///
    /// `page(i, buffer)` is called for i in 0..<pageCount, in order, and must fill the
    /// 4096-byte `buffer` (zeroed beforehand) with guest page i. `progress` gets the number
    /// of pages written so far.
    ///
    /// `metadata.memorySize` must be `pageCount × 4096` and `metadata.vcpuCount` must be
    /// `vcpus.count` (else `SnapshotError.invalidArgument`, nothing written). I/O errors are
    /// `SnapshotError.ioFailed`; errors thrown by `page` are rethrown as they are. A target
    /// that exists and is not a regular file is refused (`notARegularFile`); a stop signal
    /// abandons the write (`abandoned`).
    @discardableResult
    public static func write(to path: String, metadata: SnapshotMetadata, vcpus: [VCPUState],
                             devices: [(name: String, state: [UInt8])], pageCount: Int,
                             progress: ((Int) -> Void)? = nil,
                             page: (Int, UnsafeMutableRawBufferPointer) throws -> Void) throws -> SnapshotWriteReport {
        try writeChunks(to: path, metadata: metadata, vcpus: vcpus, devices: devices, pageCount: pageCount,
                        progress: progress) { pages, buffer in
            buffer.initializeMemory(as: UInt8.self, repeating: 0)
            for (k, i) in pages.enumerated() {
                try page(i, UnsafeMutableRawBufferPointer(rebasing: buffer[k * SnapshotFormat.pageSize..<(k + 1) * SnapshotFormat.pageSize]))
            }
        }
    }

    /// `write`, a checksum chunk (up to 16 pages, 64 KiB) at a time: `pages(range, buffer)`
    /// must fill all `range.count × 4096` bytes of `buffer` (not zeroed beforehand) — a
    /// copy-on-write snapshot copies the chunk and lifts its write protection in one go.
    @discardableResult
    public static func writeChunks(to path: String, metadata: SnapshotMetadata, vcpus: [VCPUState],
                                   devices: [(name: String, state: [UInt8])], pageCount: Int,
                                   progress: ((Int) -> Void)? = nil,
                                   pages: (Range<Int>, UnsafeMutableRawBufferPointer) throws -> Void) throws -> SnapshotWriteReport {
        let clock = ContinuousClock()
        let started = clock.now
        let pageSize = SnapshotFormat.pageSize
        guard pageCount >= 0, pageCount <= Int.max / pageSize else {
            throw SnapshotError.invalidArgument("page count \(pageCount) is out of range")
        }
        guard metadata.memorySize == UInt64(pageCount) * UInt64(pageSize) else {
            throw SnapshotError.invalidArgument("metadata says \(metadata.memorySize) bytes of memory but \(pageCount) pages (\(UInt64(pageCount) * UInt64(pageSize)) bytes) are written")
        }
        guard metadata.vcpuCount == vcpus.count else {
            throw SnapshotError.invalidArgument("metadata says \(metadata.vcpuCount) vCPUs but \(vcpus.count) vCPU states are given")
        }
        for d in devices where d.name.utf8.count > Int(UInt32.max) {
            throw SnapshotError.invalidArgument("device name of \(d.name.utf8.count) bytes is too long")
        }
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        let metadataBytes = [UInt8](try encoder.encode(metadata))
        let vcpuBytes = SnapshotVCPUCodec.encode(vcpus)
        let deviceBytes = SnapshotDeviceCodec.encode(devices)

        var target = stat()
        if stat(path, &target) == 0, target.st_mode & S_IFMT != S_IFREG { throw SnapshotError.notARegularFile(path: path) }
        let tmpPath = path + ".tmp-\(getpid())"
        ProcessLifecycle.register(path: tmpPath)  // removed if a signal or a fault ends the process
        defer { ProcessLifecycle.unregister(path: tmpPath) }
        let out = try SnapshotOutput(path: tmpPath)
        var renamed = false
        defer {
            out.close()
            if !renamed { unlink(tmpPath) }
        }

        var sections: [SnapshotSectionEntry] = []
        func section(_ kind: SnapshotSectionKind, _ bytes: [UInt8]) throws {
            sections.append(SnapshotSectionEntry(kind: kind, offset: out.position, length: UInt64(bytes.count),
                                                 crc: SnapshotCRC32C.checksum(bytes)))
            try out.append(bytes)
        }

        try out.appendZeros(SnapshotFormat.headerSize)  // written last
        try section(.metadata, metadataBytes)
        try section(.vcpus, vcpuBytes)
        try section(.devices, deviceBytes)
        let misalignment = Int(out.position % UInt64(pageSize))
        if misalignment != 0 { try out.appendZeros(pageSize - misalignment) }
        try out.flush()  // memory starts at the start of the buffer: every write is page-aligned

        // Memory, streamed page by page, checksummed in 64 KiB chunks.
        let memoryOffset = out.position
        var chunkChecksums = SnapshotByteWriter()
        chunkChecksums.bytes.reserveCapacity(SnapshotFormat.chunkCount(pages: pageCount) * 4)
        // All-zero chunks (never-written RAM, mostly) are left as holes of the file: no
        // write, no storage, and the checksum of a zero chunk is known.
        let zeroChunkCRC = [UInt8](repeating: 0, count: SnapshotFormat.chunkSize).withUnsafeBytes {
            SnapshotCRC32C.update(0, $0.baseAddress!, $0.count)
        }
        var first = 0
        while first < pageCount {
            let chunk = first..<min(first + SnapshotFormat.pagesPerChunk, pageCount)
            let slot = try out.reserve(chunk.count * pageSize)
            try pages(chunk, slot)
            if slot.count == SnapshotFormat.chunkSize, isZero(UnsafeRawBufferPointer(slot)) {
                chunkChecksums.u32(zeroChunkCRC)
                try out.skip(slot.count)
            } else {
                chunkChecksums.u32(SnapshotCRC32C.update(0, UnsafeRawPointer(slot.baseAddress!), slot.count))
                out.commit(slot.count)
            }
            first = chunk.upperBound
            if first % progressInterval == 0 {
                if ProcessLifecycle.isStopping { throw SnapshotError.abandoned(path: path) }
                if let progress, first != pageCount { progress(first) }
            }
        }
        progress?(pageCount)
        sections.append(SnapshotSectionEntry(kind: .memory, offset: memoryOffset,
                                             length: UInt64(pageCount) * UInt64(pageSize), crc: 0))
        try section(.memoryChecksums, chunkChecksums.bytes)

        // Section table, then the header that points at it.
        let table = SnapshotSectionEntry.encode(sections)
        let tableOffset = out.position
        try out.append(table)
        let header = SnapshotHeader(sectionCount: UInt32(sections.count), sectionTableOffset: tableOffset,
                                    fileSize: out.position, sectionTableCRC: SnapshotCRC32C.checksum(table))
        try out.flush()
        try out.write(header.encoded(), at: 0)
        try out.sync()
        try out.closeChecked()

        guard rename(tmpPath, path) == 0 else { throw SnapshotError.ioFailed(path: path, errno: errno) }
        renamed = true
        try syncDirectory(of: path)
        let elapsed = clock.now - started
        return SnapshotWriteReport(path: path, bytesWritten: header.fileSize, pageCount: pageCount,
                                   seconds: elapsed.seconds)
    }

    /// fsync the directory holding `path`, making the rename durable.
    static func syncDirectory(of path: String) throws {
        let dir: String
        if let slash = path.lastIndex(of: "/") {
            dir = slash == path.startIndex ? "/" : String(path[..<slash])
        } else {
            dir = "."
        }
        let fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard fd >= 0 else { throw SnapshotError.ioFailed(path: dir, errno: errno) }
        defer { Glibc.close(fd) }
        // Some file systems cannot fsync a directory; the rename has happened either way.
        if fsync(fd) != 0, errno != EINVAL, errno != ENOTSUP {
            throw SnapshotError.ioFailed(path: dir, errno: errno)
        }
    }
}

/// Whether every byte of `bytes` (a multiple of 64 bytes) is zero; stops at the first that is not.
private func isZero(_ bytes: UnsafeRawBufferPointer) -> Bool {
    let words = bytes.baseAddress!.assumingMemoryBound(to: UInt64.self)
    var i = 0
    let count = bytes.count / 8
    while i < count {
        if words[i] | words[i + 1] | words[i + 2] | words[i + 3] | words[i + 4] | words[i + 5] | words[i + 6] | words[i + 7] != 0 {
            return false
        }
        i += 8
    }
    return true
}

/// A write-only file with a 1 MiB buffer that callers fill in place.
final class SnapshotOutput {
    let path: String
    private var fd: Int32
    private let buffer: UnsafeMutableRawPointer
    private var filled = 0
    /// File offset of the next byte appended.
    private(set) var position: UInt64 = 0

    init(path: String) throws {
        fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw SnapshotError.ioFailed(path: path, errno: errno) }
        self.path = path
        buffer = UnsafeMutableRawPointer.allocate(byteCount: SnapshotWriter.bufferSize, alignment: SnapshotFormat.pageSize)
    }

    deinit {
        buffer.deallocate()
        close()
    }

    /// `count` (≤ buffer size) writable bytes at the end of the buffer; `commit` appends them.
    func reserve(_ count: Int) throws -> UnsafeMutableRawBufferPointer {
        if filled + count > SnapshotWriter.bufferSize { try flush() }
        return UnsafeMutableRawBufferPointer(start: buffer + filled, count: count)
    }

    func commit(_ count: Int) {
        filled += count
        position += UInt64(count)
    }

    func append(_ bytes: [UInt8]) throws {
        try bytes.withUnsafeBytes { raw in
            var done = 0
            while done < raw.count {
                let n = min(raw.count - done, SnapshotWriter.bufferSize - filled)
                if n == 0 { try flush(); continue }
                (buffer + filled).copyMemory(from: raw.baseAddress! + done, byteCount: n)
                commit(n)
                done += n
            }
        }
    }

    /// Advances past `count` bytes without writing them: they stay a hole of the file and
    /// read as zeros.
    func skip(_ count: Int) throws {
        try flush()
        position += UInt64(count)
    }

    func appendZeros(_ count: Int) throws {
        var left = count
        while left > 0 {
            let n = min(left, SnapshotWriter.bufferSize)
            let slot = try reserve(n)
            slot.initializeMemory(as: UInt8.self, repeating: 0)
            commit(n)
            left -= n
        }
    }

    func flush() throws {
        try writeAll(UnsafeRawPointer(buffer), filled, at: position - UInt64(filled))
        filled = 0
    }

    func write(_ bytes: [UInt8], at offset: UInt64) throws {
        try bytes.withUnsafeBytes { try writeAll($0.baseAddress!, $0.count, at: offset) }
    }

    func sync() throws {
        guard fsync(fd) == 0 else { throw SnapshotError.ioFailed(path: path, errno: errno) }
    }

    /// close(2), reporting an error (NFS and friends report deferred write errors here).
    func closeChecked() throws {
        let result = Glibc.close(fd)
        fd = -1
        guard result == 0 else { throw SnapshotError.ioFailed(path: path, errno: errno) }
    }

    func close() {
        if fd >= 0 { _ = Glibc.close(fd); fd = -1 }
    }

    private func writeAll(_ base: UnsafeRawPointer, _ count: Int, at offset: UInt64) throws {
        var done = 0
        while done < count {
            let n = pwrite(fd, base + done, count - done, off_t(offset) + off_t(done))
            if n < 0 {
                if errno == EINTR { continue }
                throw SnapshotError.ioFailed(path: path, errno: errno)
            }
            if n == 0 { throw SnapshotError.ioFailed(path: path, errno: ENOSPC) }
            done += n
        }
    }
}
