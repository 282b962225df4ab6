// The on-disk VM snapshot: vCPU states, device states and guest RAM in one versioned,
// checksummed file that is written atomically and can be restored eagerly or lazily.
//
// Layout (format version 1; all integers little-endian):
//
//     offset 0     header, 64 bytes
//                    0  8  magic "SVSNAP\0\0"
//                    8  4  format version (1)
//                   12  4  header size (64)
//                   16  4  flags (0; nonzero flags are not understood by version-1 readers)
//                   20  4  section count (5)
//                   24  8  section table offset
//                   32  8  file size (a shorter file is truncated, a longer one corrupt)
//                   40  4  page size (4096)
//                   44  4  memory chunk size (65536)
//                   48  4  CRC-32C of the section table
//                   52  8  reserved (0)
//                   60  4  CRC-32C of bytes 0..<60
//     64           metadata section: JSON of `SnapshotMetadata`
//                  vCPU section: `SnapshotVCPUCodec` (explicit binary, not Codable)
//                  device section: `SnapshotDeviceCodec`
//                  zero padding up to the next page boundary
//     page-aligned memory section: pageCount raw 4 KiB guest pages in guest-physical order,
//                  mmap-able as is (`memoryOffset`)
//                  memory checksum section: one u32 CRC-32C per 64 KiB chunk of the memory
//                  section (16 pages; the last chunk may be shorter)
//     end - 32×n   section table: n entries of 32 bytes
//                    0 u32 kind (1 metadata, 2 vcpus, 3 devices, 4 memory, 5 memory checksums)
//                    4 u32 flags (0), 8 u64 offset, 16 u64 length,
//                   24 u32 CRC-32C of the section (0 for memory), 28 u32 reserved (0)
//
// Every byte is covered by something a reader checks: the header by its CRC, the table by
// the CRC in the header, each non-memory section by its CRC in the table, padding by being
// zero, and guest memory by the chunk checksums (verified on first use by a lazy restorer,
// or all at once by `verifyMemory` / `restoreMemory`).
//
// The sections after the header are written in one streaming pass (the memory pages come
// from a page-source closure while the VM may still run, copy-on-write); the section table
// and the chunk checksums go at the end, and the header is written last. The file is built
// as `path.tmp-<pid>`, fsynced, renamed over `path`, and the directory fsynced, so a failed
// or interrupted write leaves any previous snapshot at `path` untouched.

import FoundationEssentials
import Synchronization
import VirtCore
#if canImport(Glibc)
import Glibc
#endif

/// What a snapshot says about the VM it came from; stored as JSON.
public struct SnapshotMetadata: Codable, Sendable, Equatable {
    /// The engine that ran the VM ("kvm", "emulator", …).
    public var engine: String
    /// Guest RAM in bytes; always `pageCount × 4096` of the snapshot.
    public var memorySize: UInt64
    public var vcpuCount: Int
    public var commandLine: String
    /// Identifies the guest image the VM booted (a digest, a path, a name: opaque here).
    public var imageIdentity: String
    public var created: Date
    public var note: String

    public init(engine: String, memorySize: UInt64, vcpuCount: Int, commandLine: String = "",
                imageIdentity: String = "", created: Date = Date(), note: String = "") {
        self.engine = engine; self.memorySize = memorySize; self.vcpuCount = vcpuCount
        self.commandLine = commandLine; self.imageIdentity = imageIdentity
        self.created = created; self.note = note
    }
}

public enum SnapshotError: Error, CustomStringConvertible, Equatable {
    /// The file does not start with the snapshot magic (or is empty).
    case notASnapshot
    case unsupportedVersion(found: UInt32, supported: UInt32)
    /// The file is shorter than its header and tables say.
    case truncated(expected: UInt64, actual: UInt64)
    /// A section (header, section table, metadata, vcpus, devices, memory checksums,
    /// padding, file length) fails its checksum or does not decode.
    case corrupt(section: String)
    /// A 64 KiB chunk of guest memory fails its checksum.
    case memoryChunkCorrupt(chunk: Int)
    /// Restoring into guest RAM of another size.
    case memorySizeMismatch(snapshot: UInt64, machine: UInt64)
    case ioFailed(path: String, errno: Int32)
    /// `readPage` of a page the snapshot does not have.
    case pageOutOfRange(page: Int, pageCount: Int)
    /// The writer was called with inconsistent arguments (nothing was written).
    case invalidArgument(String)
    /// The target exists and is not a regular file (a device, a FIFO, a directory).
    case notARegularFile(path: String)
    /// The process is stopping (a stop signal): the write was given up, nothing was written.
    case abandoned(path: String)
    /// The header claims more guest RAM than any machine has.
    case implausibleMemorySize(UInt64)

    public var description: String {
        switch self {
        case .notASnapshot:
            return "not a Swiftvisor snapshot (the file does not start with \"SVSNAP\"); check the path"
        case let .unsupportedVersion(found, supported):
            return found > supported
                ? "snapshot format version \(found) is newer than this build understands (version \(supported)); restore it with a newer swiftvisor"
                : "snapshot format version \(found) is not supported (this build reads version \(supported)); take a new snapshot"
        case let .truncated(expected, actual):
            return "snapshot is truncated: its tables describe \(expected) bytes but the file has \(actual); the file was cut short while copying or by a full disk — copy it again or take a new snapshot"
        case let .corrupt(section):
            return "snapshot \(section) is corrupt (checksum mismatch or malformed); the file is damaged — take a new snapshot or use another copy"
        case let .memoryChunkCorrupt(chunk):
            let start = UInt64(chunk) * UInt64(SnapshotFormat.chunkSize)
            return "guest memory chunk \(chunk) (guest-physical 0x\(String(start, radix: 16))–0x\(String(start + UInt64(SnapshotFormat.chunkSize) - 1, radix: 16))) fails its checksum; the snapshot's memory is damaged — restore from another copy"
        case let .memorySizeMismatch(snapshot, machine):
            return "snapshot holds \(MemorySize.format(snapshot)) of guest memory but the machine has \(MemorySize.format(machine)); create the machine with --memory \(MemorySize.format(snapshot))"
        case let .ioFailed(path, code):
            return "I/O on \(path) failed: \(String(cString: strerror(code))) (errno \(code)); check that the path exists, is writable and the disk has space"
        case let .pageOutOfRange(page, pageCount):
            return "page \(page) is outside the snapshot's \(pageCount) pages"
        case let .invalidArgument(why):
            return "cannot write snapshot: \(why)"
        case let .notARegularFile(path):
            return "\(path) exists and is not a regular file; a snapshot is written to a new file or over a regular one"
        case let .abandoned(path):
            return "snapshot \(path) was not written: swiftvisor is stopping"
        case let .implausibleMemorySize(size):
            return "snapshot claims \(MemorySize.format(size)) of guest memory, more than any machine has (at most \(MemorySize.format(BootLayout.maxRAM))); the file is damaged or not from this tool"
        }
    }
}

/// An opened, validated snapshot. Opening reads and checks the header and every section but
/// guest memory; memory is read on demand (`readPage`, `readChunk`, or mmap of
/// `fileDescriptor` at `memoryOffset`) with each 64 KiB chunk's checksum verified the first
/// time it is read, or all at once (`verifyMemory`, `restoreMemory`). Safe to use from
/// several threads.
public final class SnapshotFile: Sendable {
    public let path: String
    public let version: UInt32
    public let metadata: SnapshotMetadata
    public let vcpus: [VCPUState]
    public let devices: [(name: String, state: [UInt8])]
    /// Guest pages (4 KiB) in the memory section.
    public let pageCount: Int
    /// File offset of guest page 0; a multiple of the page size, so the section can be mmapped.
    public let memoryOffset: UInt64
    /// Size of the file in bytes.
    public let fileSize: UInt64
    /// Open read-only for the lifetime of this object (closed on deinit).
    public let fileDescriptor: Int32
    /// One CRC-32C per 64 KiB chunk.
    let chunkChecksums: [UInt32]
    let sections: [SnapshotSectionEntry]
    /// Bitmap of chunks whose checksum has been verified.
    private let verified: Mutex<[UInt64]>

    public var memorySize: UInt64 { UInt64(pageCount) * UInt64(SnapshotFormat.pageSize) }
    public var chunkCount: Int { chunkChecksums.count }

    public func device(named name: String) -> [UInt8]? { devices.first { $0.name == name }?.state }

    public init(path: String) throws(SnapshotError) {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw .ioFailed(path: path, errno: errno) }
        let p: Parsed
        do {
            p = try Self.parse(fd: fd, path: path)
        } catch {
            close(fd)
            throw error
        }
        self.path = path
        fileDescriptor = fd
        version = p.header.version
        metadata = p.metadata
        vcpus = p.vcpus
        devices = p.devices
        pageCount = p.pageCount
        memoryOffset = p.memoryOffset
        fileSize = p.header.fileSize
        chunkChecksums = p.chunkChecksums
        sections = p.sections
        verified = Mutex([UInt64](repeating: 0, count: (p.chunkChecksums.count + 63) / 64))
    }

    deinit { close(fileDescriptor) }

    // MARK: Guest memory

    /// Bytes of guest memory in `chunk` (65536, except perhaps for the last chunk).
    public func chunkLength(_ chunk: Int) -> Int {
        let start = chunk * SnapshotFormat.chunkSize
        return min(SnapshotFormat.chunkSize, pageCount * SnapshotFormat.pageSize - start)
    }

    public func isChunkVerified(_ chunk: Int) -> Bool {
        verified.withLock { $0[chunk / 64] & (1 << UInt64(chunk % 64)) != 0 }
    }

    /// Copies guest page `i` into `buffer` (at least 4096 bytes). The first read of any page
    /// of a 64 KiB chunk reads and verifies the whole chunk; later reads of that chunk read
    /// just the page.
    public func readPage(_ i: Int, into buffer: UnsafeMutableRawBufferPointer) throws(SnapshotError) {
        guard i >= 0, i < pageCount else { throw .pageOutOfRange(page: i, pageCount: pageCount) }
        precondition(buffer.count >= SnapshotFormat.pageSize, "readPage needs a 4096-byte buffer")
        let page = SnapshotFormat.pageSize
        let chunk = i / SnapshotFormat.pagesPerChunk
        if isChunkVerified(chunk) {
            try readExactly(buffer.baseAddress!, count: page, at: memoryOffset + UInt64(i) * UInt64(page))
            return
        }
        let scratch = UnsafeMutableRawBufferPointer.allocate(byteCount: SnapshotFormat.chunkSize, alignment: page)
        defer { scratch.deallocate() }
        try readChunk(chunk, into: scratch)
        let within = (i % SnapshotFormat.pagesPerChunk) * page
        buffer.baseAddress!.copyMemory(from: scratch.baseAddress! + within, byteCount: page)
    }

    /// Reads chunk `chunk` of guest memory into `buffer` (at least `chunkLength(chunk)`
    /// bytes) and verifies its checksum. Returns the number of bytes read.
    @discardableResult
    public func readChunk(_ chunk: Int, into buffer: UnsafeMutableRawBufferPointer) throws(SnapshotError) -> Int {
        guard chunk >= 0, chunk < chunkCount else {
            throw .pageOutOfRange(page: chunk * SnapshotFormat.pagesPerChunk, pageCount: pageCount)
        }
        let length = chunkLength(chunk)
        precondition(buffer.count >= length, "readChunk needs a buffer of chunkLength bytes")
        try readExactly(buffer.baseAddress!, count: length,
                        at: memoryOffset + UInt64(chunk) * UInt64(SnapshotFormat.chunkSize))
        try verify(chunk, UnsafeRawPointer(buffer.baseAddress!), length)
        return length
    }

    /// Reads and verifies all of guest memory; throws `memoryChunkCorrupt` for the first
    /// chunk that fails.
    public func verifyMemory() throws(SnapshotError) {
        if let bad = try corruptMemoryChunks(stopAtFirst: true).first { throw .memoryChunkCorrupt(chunk: bad) }
    }

    /// Reads all of guest memory and returns the chunks that fail their checksum (the
    /// others are marked verified).
    public func corruptMemoryChunks() throws(SnapshotError) -> [Int] {
        try corruptMemoryChunks(stopAtFirst: false)
    }

    /// Reads all of guest memory into `base` (`size` bytes, which must equal the
    /// snapshot's memory size), verifying every chunk. On `memoryChunkCorrupt` the guest
    /// RAM holds a partial copy. With `baseIsZero` (fresh guest RAM), holes of the file —
    /// the never-written RAM a snapshot leaves out — are checked against the zero chunk's
    /// checksum and not copied, so they stay unallocated.
    public func restoreMemory(into base: UnsafeMutableRawPointer, size: UInt64, baseIsZero: Bool = false) throws(SnapshotError) {
        guard size == memorySize else { throw .memorySizeMismatch(snapshot: memorySize, machine: size) }
        let zeroChunkCRC = [UInt8](repeating: 0, count: SnapshotFormat.chunkSize).withUnsafeBytes {
            SnapshotCRC32C.update(0, $0.baseAddress!, $0.count)
        }
        var chunk = 0
        while chunk < chunkCount {
            let batch = min(Self.chunksPerRead, chunkCount - chunk)
            let start = chunk * SnapshotFormat.chunkSize
            let length = (chunk + batch - 1) * SnapshotFormat.chunkSize + chunkLength(chunk + batch - 1) - start
            if baseIsZero, isHole(from: memoryOffset + UInt64(start), count: length) {
                for c in chunk..<chunk + batch {
                    guard chunkLength(c) == SnapshotFormat.chunkSize, chunkChecksums[c] == zeroChunkCRC else {
                        throw .memoryChunkCorrupt(chunk: c)
                    }
                    verified.withLock { $0[c / 64] |= 1 << UInt64(c % 64) }
                }
                chunk += batch
                continue
            }
            try readExactly(base + start, count: length, at: memoryOffset + UInt64(start))
            for c in chunk..<chunk + batch {
                try verify(c, UnsafeRawPointer(base + c * SnapshotFormat.chunkSize), chunkLength(c))
            }
            chunk += batch
        }
    }

    /// Whether the file holds no data in `count` bytes from `offset` (SEEK_DATA finds none).
    private func isHole(from offset: UInt64, count: Int) -> Bool {
        let seekData: Int32 = 3  // SEEK_DATA (Linux)
        let next = lseek(fileDescriptor, off_t(offset), seekData)
        // ENXIO: no data after `offset` at all. Any other failure: read it to be sure.
        if next < 0 { return errno == ENXIO }
        return UInt64(next) >= offset + UInt64(count)
    }

    /// Memory is read 1 MiB at a time by the whole-memory operations.
    static let chunksPerRead = 16

    private func corruptMemoryChunks(stopAtFirst: Bool) throws(SnapshotError) -> [Int] {
        let scratch = UnsafeMutableRawPointer.allocate(byteCount: Self.chunksPerRead * SnapshotFormat.chunkSize,
                                                       alignment: SnapshotFormat.pageSize)
        defer { scratch.deallocate() }
        var bad: [Int] = []
        var chunk = 0
        while chunk < chunkCount {
            let batch = min(Self.chunksPerRead, chunkCount - chunk)
            let start = chunk * SnapshotFormat.chunkSize
            let length = (batch - 1) * SnapshotFormat.chunkSize + chunkLength(chunk + batch - 1)
            try readExactly(scratch, count: length, at: memoryOffset + UInt64(start))
            for c in chunk..<chunk + batch {
                do {
                    try verify(c, UnsafeRawPointer(scratch + (c - chunk) * SnapshotFormat.chunkSize), chunkLength(c))
                } catch {
                    bad.append(c)
                    if stopAtFirst { return bad }
                }
            }
            chunk += batch
        }
        return bad
    }

    private func verify(_ chunk: Int, _ bytes: UnsafeRawPointer, _ length: Int) throws(SnapshotError) {
        guard SnapshotCRC32C.update(0, bytes, length) == chunkChecksums[chunk] else {
            throw .memoryChunkCorrupt(chunk: chunk)
        }
        verified.withLock { $0[chunk / 64] |= 1 << UInt64(chunk % 64) }
    }

    private func readExactly(_ base: UnsafeMutableRawPointer, count: Int, at offset: UInt64) throws(SnapshotError) {
        try Self.readExactly(fd: fileDescriptor, path: path, base, count: count, at: offset)
    }

    /// pread until `count` bytes arrived; end of file first is `truncated`.
    static func readExactly(fd: Int32, path: String, _ base: UnsafeMutableRawPointer, count: Int,
                            at offset: UInt64) throws(SnapshotError) {
        var done = 0
        while done < count {
            let n = pread(fd, base + done, count - done, off_t(offset) + off_t(done))
            if n < 0 {
                if errno == EINTR { continue }
                throw .ioFailed(path: path, errno: errno)
            }
            if n == 0 {
                // The file ended early (it shrank after it was opened, or the tables lie).
                var st = stat()
                let actual = fstat(fd, &st) == 0 ? UInt64(max(0, st.st_size)) : offset + UInt64(done)
                throw .truncated(expected: offset + UInt64(count), actual: actual)
            }
            done += n
        }
    }

    static func readBytes(fd: Int32, path: String, count: Int, at offset: UInt64) throws(SnapshotError) -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: count)
        guard count > 0 else { return bytes }
        var failure: SnapshotError?
        bytes.withUnsafeMutableBytes { b in
            do throws(SnapshotError) { try readExactly(fd: fd, path: path, b.baseAddress!, count: count, at: offset) } catch { failure = error }
        }
        if let failure { throw failure }
        return bytes
    }

    // MARK: Opening

    struct Parsed {
        var header: SnapshotHeader
        var sections: [SnapshotSectionEntry]
        var metadata: SnapshotMetadata
        var vcpus: [VCPUState]
        var devices: [(name: String, state: [UInt8])]
        var pageCount: Int
        var memoryOffset: UInt64
        var chunkChecksums: [UInt32]
    }

    static func parse(fd: Int32, path: String) throws(SnapshotError) -> Parsed {
        var st = stat()
        guard fstat(fd, &st) == 0 else { throw .ioFailed(path: path, errno: errno) }
        guard st.st_size >= 0 else { throw .notASnapshot }
        let actual = UInt64(st.st_size)
        guard actual >= UInt64(SnapshotFormat.magic.count) else { throw .notASnapshot }

        let headerBytes = try readBytes(fd: fd, path: path, count: Int(min(actual, UInt64(SnapshotFormat.headerSize))), at: 0)
        let header = try SnapshotHeader.decode(headerBytes, actualFileSize: actual)
        guard actual >= header.fileSize else { throw .truncated(expected: header.fileSize, actual: actual) }
        guard actual == header.fileSize else { throw .corrupt(section: "file length") }

        // Section table.
        let entrySize = UInt64(SnapshotFormat.sectionEntrySize)
        let (tableLength, o1) = UInt64(header.sectionCount).multipliedReportingOverflow(by: entrySize)
        let (tableEnd, o2) = header.sectionTableOffset.addingReportingOverflow(tableLength)
        guard !o1, !o2, header.sectionTableOffset >= UInt64(SnapshotFormat.headerSize), tableEnd <= actual,
              header.sectionCount == UInt32(SnapshotSectionKind.allCases.count) else {
            throw .corrupt(section: "section table")
        }
        let tableBytes = try readBytes(fd: fd, path: path, count: Int(tableLength), at: header.sectionTableOffset)
        guard SnapshotCRC32C.checksum(tableBytes) == header.sectionTableCRC else {
            throw .corrupt(section: "section table")
        }
        let sections = try SnapshotSectionEntry.decode(tableBytes, fileSize: actual)
        func entry(_ kind: SnapshotSectionKind) -> SnapshotSectionEntry { sections.first { $0.kind == kind }! }
        // Before reading anything large: a sparse file can claim terabytes.
        guard entry(.memory).length <= BootLayout.maxRAM else { throw .implausibleMemorySize(entry(.memory).length) }

        // No overlaps, and every byte not in a section is zero padding shorter than a page.
        var ranges = sections.map { ($0.offset, $0.end) }
        ranges.append((0, UInt64(SnapshotFormat.headerSize)))
        ranges.append((header.sectionTableOffset, tableEnd))
        ranges.sort { ($0.0, $0.1) < ($1.0, $1.1) }
        var cursor: UInt64 = 0
        for (start, end) in ranges + [(actual, actual)] {
            guard start >= cursor else { throw .corrupt(section: "section table") }
            if start > cursor {
                guard start - cursor < UInt64(SnapshotFormat.pageSize) else { throw .corrupt(section: "section table") }
                let gap = try readBytes(fd: fd, path: path, count: Int(start - cursor), at: cursor)
                guard gap.allSatisfy({ $0 == 0 }) else { throw .corrupt(section: "padding") }
            }
            cursor = end
        }

        // Memory geometry.
        let memory = entry(.memory)
        let page = UInt64(SnapshotFormat.pageSize)
        guard memory.offset % page == 0, memory.length % page == 0, let pageCount = Int(exactly: memory.length / page) else {
            throw .corrupt(section: "section table")
        }
        let chunkCount = SnapshotFormat.chunkCount(pages: pageCount)
        guard entry(.memoryChecksums).length == UInt64(chunkCount) * 4 else { throw .corrupt(section: "section table") }

        // Checksummed sections.
        func contents(_ kind: SnapshotSectionKind) throws(SnapshotError) -> [UInt8] {
            let e = entry(kind)
            guard let count = Int(exactly: e.length) else { throw .corrupt(section: kind.name) }
            let bytes = try readBytes(fd: fd, path: path, count: count, at: e.offset)
            guard SnapshotCRC32C.checksum(bytes) == e.crc else { throw .corrupt(section: kind.name) }
            return bytes
        }
        let metadataBytes = try contents(.metadata)
        let metadata: SnapshotMetadata
        do {
            metadata = try JSONDecoder().decode(SnapshotMetadata.self, from: Data(metadataBytes))
        } catch {
            throw .corrupt(section: SnapshotSectionKind.metadata.name)
        }
        let vcpus = try SnapshotVCPUCodec.decode(try contents(.vcpus))
        let devices = try SnapshotDeviceCodec.decode(try contents(.devices))
        var checksums = SnapshotByteReader(try contents(.memoryChecksums), section: SnapshotSectionKind.memoryChecksums.name)
        var chunkChecksums: [UInt32] = []
        chunkChecksums.reserveCapacity(chunkCount)
        for _ in 0..<chunkCount { chunkChecksums.append(try checksums.u32()) }

        guard metadata.memorySize == memory.length, metadata.vcpuCount == vcpus.count else {
            throw .corrupt(section: SnapshotSectionKind.metadata.name)
        }
        return Parsed(header: header, sections: sections, metadata: metadata, vcpus: vcpus, devices: devices,
                      pageCount: pageCount, memoryOffset: memory.offset, chunkChecksums: chunkChecksums)
    }

    // MARK: Inspection

    /// A human-readable summary of the snapshot at `path`, including whether guest memory
    /// passes its checksums (which reads the whole file).
    public static func inspect(path: String) throws -> String { try inspection(path: path).text }

    /// `inspect`'s text, and whether every memory chunk passed its checksum.
    public static func inspection(path: String) throws -> (text: String, memoryIntact: Bool) {
        let s = try SnapshotFile(path: path)
        func hex(_ v: UInt64) -> String { "0x" + String(v, radix: 16) }
        let m = s.metadata
        var lines = ["snapshot \(path)"]
        lines.append("  format version \(s.version), \(s.fileSize) bytes on disk")
        lines.append("  engine:       \(m.engine)")
        lines.append("  memory:       \(MemorySize.format(m.memorySize)) (\(s.pageCount) pages, \(s.chunkCount) chunks of 64 KiB) at file offset \(hex(s.memoryOffset))")
        lines.append("  vCPUs:        \(s.vcpus.count)")
        for (i, v) in s.vcpus.enumerated() {
            lines.append("    vCPU \(i): rip=\(hex(v.rip)) rsp=\(hex(v.rsp)) cr3=\(hex(v.cr3)) \(v.fpu == nil ? "no FPU state" : "with FPU state"), \(v.msrs.count) MSRs")
        }
        lines.append("  devices:      \(s.devices.count)")
        for d in s.devices { lines.append("    \(d.name): \(d.state.count) bytes") }
        lines.append("  command line: \(m.commandLine.isEmpty ? "(none)" : m.commandLine)")
        lines.append("  image:        \(m.imageIdentity.isEmpty ? "(none)" : m.imageIdentity)")
        lines.append("  created:      \(m.created.formatted(.iso8601))")
        if !m.note.isEmpty { lines.append("  note:         \(m.note)") }
        let bad = try s.corruptMemoryChunks()
        if bad.isEmpty {
            lines.append("  memory checksums: OK (\(s.chunkCount) chunks verified)")
        } else {
            let shown = bad.prefix(10).map(String.init).joined(separator: ", ")
            lines.append("  memory checksums: FAILED — \(bad.count) of \(s.chunkCount) chunks corrupt (\(shown)\(bad.count > 10 ? ", …" : ""))")
        }
        return (lines.joined(separator: "\n"), bad.isEmpty)
    }
}
