import CHost
import VirtCore

// The pieces of the snapshot format (layout documented in SnapshotFile.swift): constants,
// CRC-32C, the fixed header, the section table, and the explicit little-endian encodings
// of vCPU states and device states. Every decoder is bounds-checked and reports
// `SnapshotError.corrupt(section:)` instead of trapping.

/// Constants of the on-disk snapshot format.
public enum SnapshotFormat {
    /// "SVSNAP\0\0".
    public static let magic: [UInt8] = [0x53, 0x56, 0x53, 0x4E, 0x41, 0x50, 0, 0]
    /// The format version this build writes and the newest it reads.
    public static let version: UInt32 = 1
    public static let headerSize = 64
    public static let pageSize = 4096
    /// Guest memory is checksummed in chunks of this many bytes (the last chunk may be shorter).
    public static let chunkSize = 65536
    public static let pagesPerChunk = chunkSize / pageSize
    static let sectionEntrySize = 32

    static func chunkCount(pages: Int) -> Int { (pages + pagesPerChunk - 1) / pagesPerChunk }
}

/// The kinds of section a version-1 snapshot holds, each exactly once.
enum SnapshotSectionKind: UInt32, CaseIterable, Sendable {
    case metadata = 1, vcpus = 2, devices = 3, memory = 4, memoryChecksums = 5

    /// The name `SnapshotError.corrupt(section:)` reports.
    var name: String {
        switch self {
        case .metadata: return "metadata"
        case .vcpus: return "vcpus"
        case .devices: return "devices"
        case .memory: return "memory"
        case .memoryChecksums: return "memory checksums"
        }
    }
}

// MARK: - CRC-32C

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78, as in iSCSI, ext4 and SSE4.2's
/// `crc32`): the CPU's instruction on three interleaved streams where it has SSE4.2, a
/// slicing-by-8 table otherwise (CHost/crc32c.c).
enum SnapshotCRC32C {
    /// Continues `crc` (the value a previous call returned; 0 to start) over `count` bytes.
    @inline(__always)
    static func update(_ crc: UInt32, _ base: UnsafeRawPointer, _ count: Int) -> UInt32 {
        host_crc32c(crc, base, count)
    }

    static func checksum(_ bytes: UnsafeRawBufferPointer) -> UInt32 {
        guard let base = bytes.baseAddress else { return 0 }
        return update(0, base, bytes.count)
    }

    static func checksum(_ bytes: [UInt8]) -> UInt32 {
        bytes.withUnsafeBytes { checksum($0) }
    }
}

// MARK: - Little-endian byte encoding

struct SnapshotByteWriter {
    var bytes: [UInt8] = []

    mutating func u8(_ v: UInt8) { bytes.append(v) }
    mutating func u16(_ v: UInt16) { append(v) }
    mutating func u32(_ v: UInt32) { append(v) }
    mutating func u64(_ v: UInt64) { append(v) }
    mutating func raw(_ b: [UInt8]) { bytes.append(contentsOf: b) }

    private mutating func append<T: FixedWidthInteger>(_ v: T) {
        withUnsafeBytes(of: v.littleEndian) { bytes.append(contentsOf: $0) }
    }
}

/// Reads little-endian fields from a section's bytes; running off the end, or leaving bytes
/// unread at `finish()`, is `SnapshotError.corrupt(section:)`.
struct SnapshotByteReader {
    let bytes: [UInt8]
    let section: String
    private(set) var offset = 0

    init(_ bytes: [UInt8], section: String) { self.bytes = bytes; self.section = section }

    var remaining: Int { bytes.count - offset }

    var corrupt: SnapshotError { .corrupt(section: section) }

    mutating func u8() throws(SnapshotError) -> UInt8 {
        guard remaining >= 1 else { throw corrupt }
        defer { offset += 1 }
        return bytes[offset]
    }

    mutating func u16() throws(SnapshotError) -> UInt16 { try integer() }
    mutating func u32() throws(SnapshotError) -> UInt32 { try integer() }
    mutating func u64() throws(SnapshotError) -> UInt64 { try integer() }

    mutating func bool() throws(SnapshotError) -> Bool {
        switch try u8() {
        case 0: return false
        case 1: return true
        default: throw corrupt
        }
    }

    /// A count stored as `T` that promises at least `minimumBytesEach` bytes per element
    /// still to come; rejected before anything is allocated if the section cannot hold it.
    mutating func count<T: FixedWidthInteger & UnsignedInteger>(_: T.Type, minimumBytesEach: Int) throws(SnapshotError) -> Int {
        let v: T = try integer()
        guard let n = Int(exactly: v), minimumBytesEach == 0 || n <= remaining / minimumBytesEach else { throw corrupt }
        return n
    }

    mutating func raw(_ n: Int) throws(SnapshotError) -> [UInt8] {
        guard n >= 0, n <= remaining else { throw corrupt }
        defer { offset += n }
        return Array(bytes[offset..<offset + n])
    }

    /// Moves past `n` bytes the caller has checked are there.
    mutating func skip(_ n: Int) {
        precondition(n >= 0 && n <= remaining, "skip past the end")
        offset += n
    }

    func finish() throws(SnapshotError) {
        guard remaining == 0 else { throw corrupt }
    }

    private mutating func integer<T: FixedWidthInteger>() throws(SnapshotError) -> T {
        let size = MemoryLayout<T>.size
        guard remaining >= size else { throw corrupt }
        var v: T = 0
        for i in 0..<size { v |= T(bytes[offset + i]) << (8 * i) }
        offset += size
        return v
    }
}

// MARK: - Header and section table

/// The fixed 64-byte header at file offset 0.
struct SnapshotHeader: Equatable {
    var version = SnapshotFormat.version
    var flags: UInt32 = 0
    var sectionCount: UInt32
    var sectionTableOffset: UInt64
    var fileSize: UInt64
    var pageSize = UInt32(SnapshotFormat.pageSize)
    var chunkSize = UInt32(SnapshotFormat.chunkSize)
    var sectionTableCRC: UInt32

    func encoded() -> [UInt8] {
        var w = SnapshotByteWriter()
        w.raw(SnapshotFormat.magic)
        w.u32(version)
        w.u32(UInt32(SnapshotFormat.headerSize))
        w.u32(flags)
        w.u32(sectionCount)
        w.u64(sectionTableOffset)
        w.u64(fileSize)
        w.u32(pageSize)
        w.u32(chunkSize)
        w.u32(sectionTableCRC)
        w.u64(0)
        w.u32(SnapshotCRC32C.checksum(w.bytes))
        return w.bytes
    }

    /// Validates magic, version and CRC, in that order, so that a file from a newer
    /// writer reports its version rather than a checksum failure.
    static func decode(_ bytes: [UInt8], actualFileSize: UInt64) throws(SnapshotError) -> SnapshotHeader {
        let magic = SnapshotFormat.magic
        guard bytes.count >= magic.count, Array(bytes[0..<magic.count]) == magic else {
            throw .notASnapshot
        }
        guard bytes.count >= 12 else {
            throw .truncated(expected: UInt64(SnapshotFormat.headerSize), actual: actualFileSize)
        }
        var r = SnapshotByteReader(Array(bytes[8...]), section: "header")
        let version = try r.u32()
        guard version == SnapshotFormat.version else {
            throw .unsupportedVersion(found: version, supported: SnapshotFormat.version)
        }
        guard bytes.count >= SnapshotFormat.headerSize else {
            throw .truncated(expected: UInt64(SnapshotFormat.headerSize), actual: actualFileSize)
        }
        let stored = UInt32(bytes[60]) | UInt32(bytes[61]) << 8 | UInt32(bytes[62]) << 16 | UInt32(bytes[63]) << 24
        guard SnapshotCRC32C.checksum(Array(bytes[0..<60])) == stored else { throw .corrupt(section: "header") }
        let headerSize = try r.u32()
        let flags = try r.u32()
        let sectionCount = try r.u32()
        let tableOffset = try r.u64()
        let fileSize = try r.u64()
        let pageSize = try r.u32()
        let chunkSize = try r.u32()
        let tableCRC = try r.u32()
        let reserved = try r.u64()
        // The checksum was right, so these are what a writer meant: a writer with other
        // sizes or flags is one this reader does not understand.
        guard headerSize == SnapshotFormat.headerSize, flags == 0, pageSize == SnapshotFormat.pageSize,
              chunkSize == SnapshotFormat.chunkSize, reserved == 0 else { throw .corrupt(section: "header") }
        return SnapshotHeader(version: version, flags: flags, sectionCount: sectionCount,
                              sectionTableOffset: tableOffset, fileSize: fileSize, pageSize: pageSize,
                              chunkSize: chunkSize, sectionTableCRC: tableCRC)
    }
}

/// One 32-byte section table entry: kind, flags (0), offset, length, CRC-32C of the
/// section's bytes (0 for the memory section, which the chunk checksums cover), reserved (0).
struct SnapshotSectionEntry: Equatable, Sendable {
    var kind: SnapshotSectionKind
    var offset: UInt64
    var length: UInt64
    var crc: UInt32

    var end: UInt64 { offset + length }

    static func encode(_ entries: [SnapshotSectionEntry]) -> [UInt8] {
        var w = SnapshotByteWriter()
        for e in entries {
            w.u32(e.kind.rawValue)
            w.u32(0)
            w.u64(e.offset)
            w.u64(e.length)
            w.u32(e.crc)
            w.u32(0)
        }
        return w.bytes
    }

    /// Decodes the table and checks that every kind appears exactly once and lies inside
    /// `fileSize`.
    static func decode(_ bytes: [UInt8], fileSize: UInt64) throws(SnapshotError) -> [SnapshotSectionEntry] {
        var r = SnapshotByteReader(bytes, section: "section table")
        var entries: [SnapshotSectionEntry] = []
        while r.remaining > 0 {
            guard let kind = SnapshotSectionKind(rawValue: try r.u32()) else { throw r.corrupt }
            let flags = try r.u32()
            let offset = try r.u64()
            let length = try r.u64()
            let crc = try r.u32()
            let reserved = try r.u32()
            guard flags == 0, reserved == 0, !entries.contains(where: { $0.kind == kind }) else { throw r.corrupt }
            let (end, overflow) = offset.addingReportingOverflow(length)
            guard !overflow, end <= fileSize, offset >= UInt64(SnapshotFormat.headerSize) else { throw r.corrupt }
            guard kind != .memory || crc == 0 else { throw r.corrupt }
            entries.append(SnapshotSectionEntry(kind: kind, offset: offset, length: length, crc: crc))
        }
        guard entries.count == SnapshotSectionKind.allCases.count else { throw r.corrupt }
        return entries
    }
}

// MARK: - vCPU states

/// The binary encoding of `[VCPUState]`:
///
///     u32 count, then per vCPU:
///       u64 × 18   rax rbx rcx rdx rsi rdi rsp rbp r8…r15 rip rflags
///       segment × 8   cs ds es fs gs ss tr ldtr, each 17 bytes:
///                     u16 selector, u64 base, u32 limit, u8 type, u8 dpl,
///                     u8 flags (bit 0 present, 1 db, 2 s, 3 l, 4 g, 5 avl, 6 unusable)
///       u64 gdt.base, u16 gdt.limit, u64 idt.base, u16 idt.limit
///       u64 × 7    cr0 cr2 cr3 cr4 cr8 efer apicBase
///       u32 msrCount, then msrCount × (u32 index, u64 value), indices strictly ascending
///       u8 flags: bit 0 FPU state follows; bits 1–3 `InterruptBlocking` (STI, MOV SS, NMI),
///         zero in files from before they were saved; bit 4 XCR0 follows the FPU state
///         (files from before it was saved restore XCR0 = 1); if bit 0:
///         u16 fcw, u16 fsw, u8 ftwx, u16 lastOpcode, u64 lastIP, u64 lastDP, u32 mxcsr,
///         u32 n, n bytes x87; u32 m, m bytes xmm; if bit 4 too: u64 xcr0
enum SnapshotVCPUCodec {
    static let section = SnapshotSectionKind.vcpus.name
    /// The smallest encoded vCPU (no MSRs, no FPU).
    static let minimumRecordSize = 18 * 8 + 8 * 17 + 2 * 10 + 7 * 8 + 4 + 1

    static func encode(_ states: [VCPUState]) -> [UInt8] {
        var w = SnapshotByteWriter()
        w.u32(UInt32(states.count))
        for s in states { encode(s, into: &w) }
        return w.bytes
    }

    static func decode(_ bytes: [UInt8]) throws(SnapshotError) -> [VCPUState] {
        var r = SnapshotByteReader(bytes, section: section)
        let n = try r.count(UInt32.self, minimumBytesEach: minimumRecordSize)
        var states: [VCPUState] = []
        states.reserveCapacity(n)
        for _ in 0..<n { states.append(try decodeOne(&r)) }
        try r.finish()
        return states
    }

    static func encode(_ s: VCPUState, into w: inout SnapshotByteWriter) {
        for v in [s.rax, s.rbx, s.rcx, s.rdx, s.rsi, s.rdi, s.rsp, s.rbp,
                  s.r8, s.r9, s.r10, s.r11, s.r12, s.r13, s.r14, s.r15, s.rip, s.rflags] { w.u64(v) }
        for seg in [s.cs, s.ds, s.es, s.fs, s.gs, s.ss, s.tr, s.ldtr] {
            w.u16(seg.selector); w.u64(seg.base); w.u32(seg.limit); w.u8(seg.type); w.u8(seg.dpl)
            var flags: UInt8 = 0
            for (bit, on) in [seg.present, seg.db, seg.s, seg.l, seg.g, seg.avl, seg.unusable].enumerated() where on {
                flags |= 1 << bit
            }
            w.u8(flags)
        }
        w.u64(s.gdt.base); w.u16(s.gdt.limit); w.u64(s.idt.base); w.u16(s.idt.limit)
        for v in [s.cr0, s.cr2, s.cr3, s.cr4, s.cr8, s.efer, s.apicBase] { w.u64(v) }
        w.u32(UInt32(s.msrs.count))
        for (index, value) in s.msrs.sorted(by: { $0.key < $1.key }) { w.u32(index); w.u64(value) }
        w.u8((s.fpu == nil ? 0 : 1 | 1 << 4) | s.interruptBlocking.rawValue << 1)
        if let f = s.fpu {
            w.u16(f.fcw); w.u16(f.fsw); w.u8(f.ftwx); w.u16(f.lastOpcode)
            w.u64(f.lastIP); w.u64(f.lastDP); w.u32(f.mxcsr)
            w.u32(UInt32(f.x87.count)); w.raw(f.x87)
            w.u32(UInt32(f.xmm.count)); w.raw(f.xmm)
            w.u64(f.xcr0)
        }
    }

    static func decodeOne(_ r: inout SnapshotByteReader) throws(SnapshotError) -> VCPUState {
        var s = VCPUState()
        s.rax = try r.u64(); s.rbx = try r.u64(); s.rcx = try r.u64(); s.rdx = try r.u64()
        s.rsi = try r.u64(); s.rdi = try r.u64(); s.rsp = try r.u64(); s.rbp = try r.u64()
        s.r8 = try r.u64(); s.r9 = try r.u64(); s.r10 = try r.u64(); s.r11 = try r.u64()
        s.r12 = try r.u64(); s.r13 = try r.u64(); s.r14 = try r.u64(); s.r15 = try r.u64()
        s.rip = try r.u64(); s.rflags = try r.u64()
        s.cs = try segment(&r); s.ds = try segment(&r); s.es = try segment(&r); s.fs = try segment(&r)
        s.gs = try segment(&r); s.ss = try segment(&r); s.tr = try segment(&r); s.ldtr = try segment(&r)
        s.gdt = DescriptorTableRegister(base: try r.u64(), limit: try r.u16())
        s.idt = DescriptorTableRegister(base: try r.u64(), limit: try r.u16())
        s.cr0 = try r.u64(); s.cr2 = try r.u64(); s.cr3 = try r.u64(); s.cr4 = try r.u64(); s.cr8 = try r.u64()
        s.efer = try r.u64(); s.apicBase = try r.u64()
        let msrCount = try r.count(UInt32.self, minimumBytesEach: 12)
        var previous: UInt32?
        for _ in 0..<msrCount {
            let index = try r.u32()
            let value = try r.u64()
            if let p = previous, index <= p { throw r.corrupt }
            previous = index
            s.msrs[index] = value
        }
        let flags = try r.u8()
        guard flags & 0xE0 == 0, flags & 0x11 != 0x10, let blocking = InterruptBlocking(exactly: flags >> 1 & 7) else { throw r.corrupt }
        s.interruptBlocking = blocking
        if flags & 1 != 0 {
            var f = FPUState()
            f.fcw = try r.u16(); f.fsw = try r.u16(); f.ftwx = try r.u8(); f.lastOpcode = try r.u16()
            f.lastIP = try r.u64(); f.lastDP = try r.u64(); f.mxcsr = try r.u32()
            f.x87 = try r.raw(try r.count(UInt32.self, minimumBytesEach: 1))
            f.xmm = try r.raw(try r.count(UInt32.self, minimumBytesEach: 1))
            if flags & 1 << 4 != 0 { f.xcr0 = try r.u64() }
            s.fpu = f
        }
        return s
    }

    private static func segment(_ r: inout SnapshotByteReader) throws(SnapshotError) -> SegmentRegister {
        let selector = try r.u16(), base = try r.u64(), limit = try r.u32(), type = try r.u8(), dpl = try r.u8()
        let flags = try r.u8()
        guard flags & 0x80 == 0 else { throw r.corrupt }
        func bit(_ n: UInt8) -> Bool { flags & (1 << n) != 0 }
        return SegmentRegister(selector: selector, base: base, limit: limit, type: type, present: bit(0),
                               dpl: dpl, db: bit(1), s: bit(2), l: bit(3), g: bit(4), avl: bit(5), unusable: bit(6))
    }
}

// MARK: - Device states

/// The binary encoding of the device list: `u32 count`, then per device
/// `u32 nameLength, UTF-8 name, u64 stateLength, state bytes`.
enum SnapshotDeviceCodec {
    static let section = SnapshotSectionKind.devices.name

    static func encode(_ devices: [(name: String, state: [UInt8])]) -> [UInt8] {
        var w = SnapshotByteWriter()
        w.u32(UInt32(devices.count))
        for d in devices {
            let name = Array(d.name.utf8)
            w.u32(UInt32(name.count)); w.raw(name)
            w.u64(UInt64(d.state.count)); w.raw(d.state)
        }
        return w.bytes
    }

    static func decode(_ bytes: [UInt8]) throws(SnapshotError) -> [(name: String, state: [UInt8])] {
        var r = SnapshotByteReader(bytes, section: section)
        let n = try r.count(UInt32.self, minimumBytesEach: 12)
        var devices: [(name: String, state: [UInt8])] = []
        devices.reserveCapacity(n)
        for _ in 0..<n {
            let nameBytes = try r.raw(try r.count(UInt32.self, minimumBytesEach: 1))
            let name = String(decoding: nameBytes, as: UTF8.self)
            guard Array(name.utf8) == nameBytes else { throw r.corrupt }  // not valid UTF-8
            let state = try r.raw(try r.count(UInt64.self, minimumBytesEach: 1))
            devices.append((name: name, state: state))
        }
        try r.finish()
        return devices
    }
}
