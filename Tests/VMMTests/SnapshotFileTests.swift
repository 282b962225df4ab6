import Foundation
import TestSupport
import Testing
import VirtCore
@testable import VMM
#if canImport(Glibc)
import Glibc
#endif

/// A fresh directory under /tmp, removed when the value goes away.
final class ScratchDirectory {
    let path: String

    init() {
        var template = Array("/tmp/swiftvisor-snapshot-XXXXXX".utf8CString)
        let made = template.withUnsafeMutableBufferPointer { mkdtemp($0.baseAddress!) }
        path = made.map { String(cString: $0) } ?? "/tmp"
    }

    deinit { try? FileManager.default.removeItem(atPath: path) }

    func file(_ name: String) -> String { path + "/" + name }

    var contents: [String] { (try? FileManager.default.contentsOfDirectory(atPath: path))?.sorted() ?? [] }
}

private struct PageSourceFailed: Error, Equatable {}

private enum Fixture {
    static func vcpu(_ n: Int, fpu: Bool = true) -> VCPUState {
        var s = VCPUState()
        s.gprs = (0..<16).map { UInt64(n + 1) << 56 | UInt64($0) &* 0x0101_0101_0101 }
        s.rip = 0xFFFF_8000_0010_0000 + UInt64(n) * 0x40
        s.rflags = 0x246
        s.cs = .code64(selector: 0x8)
        s.ds = .data(selector: 0x10)
        s.es = .data(selector: 0x23, dpl: 3)
        s.fs = SegmentRegister(selector: 0, base: 0x7F00_0000_0000 + UInt64(n), limit: 0xFFFF_FFFF, type: 3, present: true, avl: true)
        s.gs = SegmentRegister(selector: 0, base: 0xFFFF_8800_0000_0000 + UInt64(n) << 12)
        s.ss = .data(selector: 0x10)
        s.tr = SegmentRegister(selector: 0x28, base: 0x1000 + UInt64(n) * 0x68, limit: 0x67, type: 0xB, present: true)
        s.ldtr = SegmentRegister(selector: 0, base: 0, limit: 0, type: 0, unusable: true)
        s.gdt = DescriptorTableRegister(base: 0x5000, limit: 0x37)
        s.idt = DescriptorTableRegister(base: 0x6000, limit: 0xFFF)
        s.cr0 = 0x8005_0033; s.cr2 = 0xDEAD_BEEF; s.cr3 = 0x10_0000 * UInt64(n + 1); s.cr4 = 0x6B0; s.cr8 = 3
        s.efer = 0xD01
        s.apicBase = 0xFEE0_0800 | (n == 0 ? 0x100 : 0)
        for (k, index) in MSR.saved.enumerated() { s.msrs[index] = UInt64(k) &* 0x1111_2222_3333 &+ UInt64(n) }
        s.interruptBlocking = InterruptBlocking(rawValue: UInt8(n) & InterruptBlocking.all.rawValue)
        if fpu {
            var f = FPUState()
            f.fcw = 0x27F; f.fsw = 0x3800; f.ftwx = 0x81; f.lastOpcode = 0x1D9
            f.lastIP = 0x40_1234; f.lastDP = 0x60_5678; f.mxcsr = 0x1FA0
            f.x87 = (0..<128).map { UInt8(truncatingIfNeeded: $0 * 3 + n) }
            f.xmm = (0..<256).map { UInt8(truncatingIfNeeded: $0 * 5 + 7 * n) }
            s.fpu = f
        }
        return s
    }

    static let vcpus = [vcpu(0), vcpu(1), vcpu(2, fpu: false), VCPUState()]

    static let devices: [(name: String, state: [UInt8])] = [
        ("uart0", Array(0..<16)),
        ("virtio-blk@0xd0000000", (0..<300).map { UInt8(truncatingIfNeeded: $0 * 7) }),
        ("empty", []),
        ("ünïcødé", [0xFF]),
    ]

    static let created = Date(timeIntervalSince1970: 1_764_000_000.125)

    static func metadata(pages: Int, vcpus: Int, note: String = "") -> SnapshotMetadata {
        SnapshotMetadata(engine: "kvm", memorySize: UInt64(pages) * 4096, vcpuCount: vcpus,
                         commandLine: "console=ttyS0 quiet", imageIdentity: "sha256:0123abcd",
                         created: created, note: note)
    }

    /// Guest page `i` of the test pattern: distinct in every page and word.
    static func fill(page i: Int, salt: UInt64 = 0, _ buffer: UnsafeMutableRawBufferPointer) {
        for w in 0..<512 {
            let v = (UInt64(i) << 32 | UInt64(w)) &* 0x9E37_79B9_7F4A_7C15 ^ salt
            buffer.storeBytes(of: v, toByteOffset: w * 8, as: UInt64.self)
        }
    }

    static func page(_ i: Int, salt: UInt64 = 0) -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: 4096)
        bytes.withUnsafeMutableBytes { fill(page: i, salt: salt, $0) }
        return bytes
    }

    @discardableResult
    static func write(_ path: String, pages: Int, vcpus: [VCPUState] = Fixture.vcpus, note: String = "",
                      salt: UInt64 = 0) throws -> SnapshotWriteReport {
        try SnapshotWriter.write(to: path, metadata: metadata(pages: pages, vcpus: vcpus.count, note: note),
                                 vcpus: vcpus, devices: devices, pageCount: pages) { i, buffer in
            fill(page: i, salt: salt, buffer)
        }
    }
}

// MARK: - File byte helpers

func fileBytes(_ path: String) -> [UInt8] {
    (try? [UInt8](Data(contentsOf: URL(fileURLWithPath: path)))) ?? []
}

func setFileBytes(_ path: String, _ bytes: [UInt8]) {
    precondition(FileManager.default.createFile(atPath: path, contents: Data(bytes)))
}

/// XORs the byte at `offset` with `mask` in place.
private func flip(_ path: String, at offset: Int, mask: UInt8 = 0x40) {
    let fd = open(path, O_RDWR)
    precondition(fd >= 0)
    defer { close(fd) }
    var b: UInt8 = 0
    precondition(pread(fd, &b, 1, off_t(offset)) == 1)
    b ^= mask
    precondition(pwrite(fd, &b, 1, off_t(offset)) == 1)
}

func storeLE32(_ v: UInt32, into bytes: inout [UInt8], at offset: Int) {
    for i in 0..<4 { bytes[offset + i] = UInt8(truncatingIfNeeded: v >> (8 * i)) }
}

/// Recomputes every section checksum, the table checksum and the header checksum, so that
/// the decoders behind them see whatever bytes a test put there.
func reseal(_ bytes: inout [UInt8], sections: [SnapshotSectionEntry], tableOffset: Int) {
    for (i, e) in sections.enumerated() where e.kind != .memory {
        let crc = SnapshotCRC32C.checksum(Array(bytes[Int(e.offset)..<Int(e.end)]))
        storeLE32(crc, into: &bytes, at: tableOffset + i * 32 + 24)
    }
    let tableCRC = SnapshotCRC32C.checksum(Array(bytes[tableOffset..<tableOffset + sections.count * 32]))
    storeLE32(tableCRC, into: &bytes, at: 48)
    storeLE32(SnapshotCRC32C.checksum(Array(bytes[0..<60])), into: &bytes, at: 60)
}

private func expectSameDevices(_ a: [(name: String, state: [UInt8])], _ b: [(name: String, state: [UInt8])]) {
    #expect(a.map(\.name) == b.map(\.name))
    #expect(a.map(\.state) == b.map(\.state))
}

@Suite struct SnapshotFileTests {
    // 64 full chunks plus a 5-page partial chunk: a little over 4 MiB.
    static let pages = 64 * 16 + 5

    // MARK: Building blocks

    @Test func crc32cMatchesKnownVectors() {
        #expect(SnapshotCRC32C.checksum(Array("123456789".utf8)) == 0xE306_9283)
        #expect(SnapshotCRC32C.checksum([UInt8]()) == 0)
        // RFC 3720, B.4.
        #expect(SnapshotCRC32C.checksum([UInt8](repeating: 0, count: 32)) == 0x8A91_36AA)
        #expect(SnapshotCRC32C.checksum([UInt8](repeating: 0xFF, count: 32)) == 0x62A8_AB43)
        #expect(SnapshotCRC32C.checksum((0..<32).map { UInt8($0) }) == 0x46DD_794E)
        // Incremental over any split (exercises the 16-byte and the byte-at-a-time paths).
        let data = (0..<1000).map { UInt8(truncatingIfNeeded: $0 &* 37 &+ 11) }
        let whole = SnapshotCRC32C.checksum(data)
        for split in [0, 1, 7, 15, 16, 17, 500, 999, 1000] {
            let crc = data.withUnsafeBytes { b in
                SnapshotCRC32C.update(SnapshotCRC32C.update(0, b.baseAddress!, split), b.baseAddress! + split, 1000 - split)
            }
            #expect(crc == whole, "split at \(split)")
        }
    }

    /// The interleaved hardware path (three 2 KiB streams combined) and any alignment agree
    /// with a bit-at-a-time reference.
    @Test func crc32cMatchesBitwiseReferenceOnLongUnalignedRuns() {
        func reference(_ bytes: ArraySlice<UInt8>) -> UInt32 {
            var c: UInt32 = 0xFFFF_FFFF
            for b in bytes {
                c ^= UInt32(b)
                for _ in 0..<8 { c = c & 1 != 0 ? (c >> 1) ^ 0x82F6_3B78 : c >> 1 }
            }
            return ~c
        }
        var generator = SplitMix64(seed: 0xC5C3_2C)
        let data = (0..<20_000).map { _ in UInt8(truncatingIfNeeded: generator.next()) }
        for (start, length) in [(0, 6144), (1, 6144), (3, 6143), (5, 12_300), (7, 19_993), (0, 20_000), (13, 7)] {
            let crc = data.withUnsafeBytes { SnapshotCRC32C.update(0, $0.baseAddress! + start, length) }
            #expect(crc == reference(data[start..<start + length]), "\(length) bytes at offset \(start)")
        }
    }

    @Test func vcpuEncodingRoundTripsEveryField() throws {
        let states = Fixture.vcpus
        let bytes = SnapshotVCPUCodec.encode(states)
        #expect(try SnapshotVCPUCodec.decode(bytes) == states)
        #expect(try SnapshotVCPUCodec.decode(SnapshotVCPUCodec.encode([])) == [])
        // Odd FPU array sizes and extreme values survive too.
        var odd = Fixture.vcpu(7)
        odd.fpu!.x87 = [1, 2, 3]; odd.fpu!.xmm = []
        odd.rip = .max; odd.cs.type = 0xFF; odd.cs.dpl = 0xFF; odd.gdt.limit = .max
        odd.msrs = [0: 1, .max: .max]
        #expect(try SnapshotVCPUCodec.decode(SnapshotVCPUCodec.encode([odd])) == [odd])
    }

    /// The FPU byte carries the interrupt blocking in bits 1–3: a file written before that
    /// (0 or 1) still reads, a bit that names nothing is corruption.
    @Test func vcpuFlagsByteKeepsOldFilesAndRejectsUnknownBits() throws {
        var state = Fixture.vcpu(1, fpu: false)
        state.interruptBlocking = []
        var bytes = SnapshotVCPUCodec.encode([state])
        let flagsOffset = bytes.count - 1
        #expect(bytes[flagsOffset] == 0)
        bytes[flagsOffset] = 0b1010  // STI and NMI blocking, no FPU
        #expect(try SnapshotVCPUCodec.decode(bytes)[0].interruptBlocking == [.bySTI, .nmi])
        bytes[flagsOffset] = 0b1_0000
        #expect(throws: SnapshotError.self) { try SnapshotVCPUCodec.decode(bytes) }
    }

    @Test func vcpuDecoderRejectsEveryTruncationAndTrailingBytes() {
        let bytes = SnapshotVCPUCodec.encode(Array(Fixture.vcpus.prefix(2)))
        for n in 0..<bytes.count {
            #expect(throws: SnapshotError.corrupt(section: "vcpus")) { try SnapshotVCPUCodec.decode(Array(bytes[0..<n])) }
        }
        #expect(throws: SnapshotError.corrupt(section: "vcpus")) { try SnapshotVCPUCodec.decode(bytes + [0]) }
        // A count far beyond what the section holds is rejected before anything is allocated.
        var huge = bytes
        huge.replaceSubrange(0..<4, with: [0xFF, 0xFF, 0xFF, 0xFF])
        #expect(throws: SnapshotError.corrupt(section: "vcpus")) { try SnapshotVCPUCodec.decode(huge) }
    }

    @Test func deviceEncodingRoundTripsAndRejectsBadInput() throws {
        let decoded = try SnapshotDeviceCodec.decode(SnapshotDeviceCodec.encode(Fixture.devices))
        expectSameDevices(decoded, Fixture.devices)
        let bytes = SnapshotDeviceCodec.encode([("a", [1, 2, 3])])
        for n in 0..<bytes.count {
            #expect(throws: SnapshotError.corrupt(section: "devices")) { try SnapshotDeviceCodec.decode(Array(bytes[0..<n])) }
        }
        var badUTF8 = bytes
        badUTF8[8] = 0xC3  // a lead byte with no continuation
        #expect(throws: SnapshotError.corrupt(section: "devices")) { try SnapshotDeviceCodec.decode(badUTF8) }
    }

    @Test func decodersSurviveRandomMutations() {
        var rng = SplitMix64(seed: 0x5EED)
        let vcpu = SnapshotVCPUCodec.encode(Fixture.vcpus)
        let devices = SnapshotDeviceCodec.encode(Fixture.devices)
        for round in 0..<3000 {
            for original in [vcpu, devices] {
                var b = original
                for _ in 0..<Int.random(in: 1...4, using: &rng) {
                    switch Int.random(in: 0..<4, using: &rng) {
                    case 0: b[Int.random(in: 0..<b.count, using: &rng)] = UInt8.random(in: 0...255, using: &rng)
                    case 1: b.removeLast(Int.random(in: 0...min(40, b.count - 1), using: &rng))
                    case 2: b.insert(UInt8.random(in: 0...255, using: &rng), at: Int.random(in: 0...b.count, using: &rng))
                    default: b[Int.random(in: 0..<b.count, using: &rng)] ^= 0x80
                    }
                }
                // Must either decode or throw a typed error; never trap.
                _ = try? SnapshotVCPUCodec.decode(b)
                _ = try? SnapshotDeviceCodec.decode(b)
            }
            _ = round
        }
    }

    // MARK: Round trip

    @Test func roundTripsEverything() throws {
        let dir = ScratchDirectory()
        let path = dir.file("vm.snap")
        var order: [Int] = []
        var reported: [Int] = []
        let report = try SnapshotWriter.write(to: path, metadata: Fixture.metadata(pages: Self.pages, vcpus: 4, note: "first"),
                                              vcpus: Fixture.vcpus, devices: Fixture.devices, pageCount: Self.pages,
                                              progress: { reported.append($0) }) { i, buffer in
            #expect(buffer.count == 4096)
            #expect(buffer.allSatisfy { $0 == 0 })
            order.append(i)
            Fixture.fill(page: i, buffer)
        }
        #expect(order == Array(0..<Self.pages))
        #expect(reported == [256, 512, 768, 1024, Self.pages])
        #expect(report.pageCount == Self.pages)
        #expect(report.bytesWritten == UInt64(fileBytes(path).count))
        #expect(report.seconds > 0)
        #expect(dir.contents == ["vm.snap"])

        let s = try SnapshotFile(path: path)
        #expect(s.version == 1)
        #expect(s.metadata == Fixture.metadata(pages: Self.pages, vcpus: 4, note: "first"))
        #expect(s.vcpus == Fixture.vcpus)
        expectSameDevices(s.devices, Fixture.devices)
        #expect(s.device(named: "uart0") == Array(0..<16))
        #expect(s.pageCount == Self.pages)
        #expect(s.memorySize == UInt64(Self.pages) * 4096)
        #expect(s.chunkCount == 65)
        #expect(s.chunkLength(64) == 5 * 4096)
        #expect(s.memoryOffset % 4096 == 0 && s.memoryOffset > 0)
        #expect(s.fileSize == report.bytesWritten)

        // Lazy: pages in any order, each chunk verified once.
        let page = UnsafeMutableRawBufferPointer.allocate(byteCount: 4096, alignment: 4096)
        defer { page.deallocate() }
        for i in [Self.pages - 1, 0, 17, 16, 1, 1000, 1024, 1028] {
            try s.readPage(i, into: page)
            #expect(Array(page) == Fixture.page(i), "page \(i)")
        }
        #expect(s.isChunkVerified(0) && s.isChunkVerified(1) && s.isChunkVerified(64) && !s.isChunkVerified(2))
        #expect(throws: SnapshotError.pageOutOfRange(page: Self.pages, pageCount: Self.pages)) { try s.readPage(Self.pages, into: page) }
        #expect(throws: SnapshotError.pageOutOfRange(page: -1, pageCount: Self.pages)) { try s.readPage(-1, into: page) }

        // Chunks.
        let chunk = UnsafeMutableRawBufferPointer.allocate(byteCount: 65536, alignment: 4096)
        defer { chunk.deallocate() }
        #expect(try s.readChunk(64, into: chunk) == 5 * 4096)
        #expect(Array(chunk[4096..<8192]) == Fixture.page(1025))
        #expect(try s.readChunk(3, into: chunk) == 65536)
        #expect(Array(chunk[0..<4096]) == Fixture.page(48))

        // Eager.
        try s.verifyMemory()
        #expect(try s.corruptMemoryChunks() == [])
        let size = Self.pages * 4096
        let ram = UnsafeMutableRawPointer.allocate(byteCount: size, alignment: 4096)
        defer { ram.deallocate() }
        try s.restoreMemory(into: ram, size: UInt64(size))
        for i in stride(from: 0, to: Self.pages, by: 37) + [Self.pages - 1] {
            #expect(Array(UnsafeRawBufferPointer(start: ram + i * 4096, count: 4096)) == Fixture.page(i), "page \(i)")
        }
    }

    @Test func memorySectionCanBeMapped() throws {
        let dir = ScratchDirectory()
        let path = dir.file("vm.snap")
        try Fixture.write(path, pages: 40)
        let s = try SnapshotFile(path: path)
        let length = s.pageCount * 4096
        let map = mmap(nil, length, PROT_READ, MAP_PRIVATE, s.fileDescriptor, off_t(s.memoryOffset))
        #expect(map != MAP_FAILED)
        guard let map, map != MAP_FAILED else { return }
        defer { munmap(map, length) }
        for i in [0, 15, 16, 39] {
            #expect(Array(UnsafeRawBufferPointer(start: map + i * 4096, count: 4096)) == Fixture.page(i))
        }
    }

    @Test func emptyMemoryAndNoDevices() throws {
        let dir = ScratchDirectory()
        let path = dir.file("tiny.snap")
        try SnapshotWriter.write(to: path, metadata: Fixture.metadata(pages: 0, vcpus: 1), vcpus: [VCPUState()],
                                 devices: [], pageCount: 0) { _, _ in Issue.record("no pages to ask for") }
        let s = try SnapshotFile(path: path)
        #expect(s.pageCount == 0 && s.chunkCount == 0 && s.devices.isEmpty && s.vcpus == [VCPUState()])
        try s.verifyMemory()
        var nothing: UInt8 = 0
        try s.restoreMemory(into: &nothing, size: 0)
    }

    @Test func inspectSummarises() throws {
        let dir = ScratchDirectory()
        let path = dir.file("vm.snap")
        try Fixture.write(path, pages: Self.pages, note: "before upgrade")
        let text = try SnapshotFile.inspect(path: path)
        for needle in ["format version 1", "engine:       kvm", "1029 pages", "vCPUs:        4",
                       "rip=0xffff800000100040", "uart0: 16 bytes", "virtio-blk@0xd0000000: 300 bytes",
                       "console=ttyS0 quiet", "sha256:0123abcd", "2025-11-24", "before upgrade",
                       "memory checksums: OK (65 chunks verified)", "\(fileBytes(path).count) bytes on disk"] {
            #expect(text.contains(needle), "missing \(needle) in:\n\(text)")
        }
        let s = try SnapshotFile(path: path)
        flip(path, at: Int(s.memoryOffset) + 7 * 65536 + 3)
        flip(path, at: Int(s.memoryOffset) + 64 * 65536)
        let bad = try SnapshotFile.inspect(path: path)
        #expect(bad.contains("FAILED — 2 of 65 chunks corrupt (7, 64)"), "\(bad)")
    }

    // MARK: Atomic replacement

    @Test func failedWriteLeavesPreviousSnapshotIntact() throws {
        let dir = ScratchDirectory()
        let path = dir.file("vm.snap")
        try Fixture.write(path, pages: 100, note: "good")
        let before = fileBytes(path)
        #expect(throws: PageSourceFailed()) {
            try SnapshotWriter.write(to: path, metadata: Fixture.metadata(pages: 300, vcpus: 1, note: "bad"),
                                     vcpus: [VCPUState()], devices: [], pageCount: 300) { i, buffer in
                if i == 290 { throw PageSourceFailed() }  // past the first 1 MiB flush
                Fixture.fill(page: i, salt: 1, buffer)
            }
        }
        #expect(fileBytes(path) == before)
        #expect(dir.contents == ["vm.snap"])  // the temporary file is gone
        let s = try SnapshotFile(path: path)
        #expect(s.metadata.note == "good")
        try s.verifyMemory()

        // A successful write replaces it.
        try Fixture.write(path, pages: 20, note: "second", salt: 9)
        let t = try SnapshotFile(path: path)
        #expect(t.metadata.note == "second" && t.pageCount == 20)
        let page = UnsafeMutableRawBufferPointer.allocate(byteCount: 4096, alignment: 4096)
        defer { page.deallocate() }
        try t.readPage(19, into: page)
        #expect(Array(page) == Fixture.page(19, salt: 9))
        #expect(dir.contents == ["vm.snap"])
        // The old object keeps reading the file it opened.
        try s.readPage(99, into: page)
        #expect(Array(page) == Fixture.page(99))
    }

    @Test func writeErrorsAreTyped() throws {
        let dir = ScratchDirectory()
        #expect(throws: SnapshotError.ioFailed(path: dir.file("missing/vm.snap.tmp-\(getpid())"), errno: ENOENT)) {
            try Fixture.write(dir.file("missing/vm.snap"), pages: 1)
        }
        #expect(throws: SnapshotError.self) {
            try SnapshotWriter.write(to: dir.file("x"), metadata: Fixture.metadata(pages: 2, vcpus: 1), vcpus: [VCPUState()],
                                     devices: [], pageCount: 3) { _, _ in }
        }
        #expect(throws: SnapshotError.self) {
            try SnapshotWriter.write(to: dir.file("x"), metadata: Fixture.metadata(pages: 2, vcpus: 2), vcpus: [VCPUState()],
                                     devices: [], pageCount: 2) { _, _ in }
        }
        #expect(dir.contents.isEmpty)
    }

    // MARK: Rejecting bad files

    @Test func rejectsFilesThatAreNotSnapshots() throws {
        let dir = ScratchDirectory()
        let path = dir.file("x")
        #expect(throws: SnapshotError.ioFailed(path: path, errno: ENOENT)) { try SnapshotFile(path: path) }
        #expect(throws: SnapshotError.self) { try SnapshotFile(path: dir.path) }  // a directory
        setFileBytes(path, [])
        #expect(throws: SnapshotError.notASnapshot) { try SnapshotFile(path: path) }
        setFileBytes(path, Array("SVSNA".utf8))
        #expect(throws: SnapshotError.notASnapshot) { try SnapshotFile(path: path) }
        setFileBytes(path, Array("\u{7F}ELF".utf8) + [UInt8](repeating: 0, count: 200))
        #expect(throws: SnapshotError.notASnapshot) { try SnapshotFile(path: path) }

        try Fixture.write(path, pages: 3)
        let good = fileBytes(path)
        var wrongMagic = good
        wrongMagic[5] = UInt8(ascii: "Q")
        setFileBytes(path, wrongMagic)
        #expect(throws: SnapshotError.notASnapshot) { try SnapshotFile(path: path) }
        setFileBytes(path, Array(good[0..<40]))
        #expect(throws: SnapshotError.truncated(expected: 64, actual: 40)) { try SnapshotFile(path: path) }
    }

    @Test func rejectsOtherVersions() throws {
        let dir = ScratchDirectory()
        let path = dir.file("vm.snap")
        try Fixture.write(path, pages: 3)
        var bytes = fileBytes(path)
        storeLE32(2, into: &bytes, at: 8)
        setFileBytes(path, bytes)  // header CRC now wrong: the version is still what is reported
        #expect(throws: SnapshotError.unsupportedVersion(found: 2, supported: 1)) { try SnapshotFile(path: path) }
        storeLE32(SnapshotCRC32C.checksum(Array(bytes[0..<60])), into: &bytes, at: 60)
        setFileBytes(path, bytes)
        #expect(throws: SnapshotError.unsupportedVersion(found: 2, supported: 1)) { try SnapshotFile(path: path) }
        storeLE32(0, into: &bytes, at: 8)
        setFileBytes(path, bytes)
        #expect(throws: SnapshotError.unsupportedVersion(found: 0, supported: 1)) { try SnapshotFile(path: path) }
    }

    @Test func rejectsCorruptHeader() throws {
        let dir = ScratchDirectory()
        let path = dir.file("vm.snap")
        try Fixture.write(path, pages: 3)
        let good = fileBytes(path)
        for offset in [12, 16, 20, 24, 33, 40, 47, 48, 55, 60, 63] {
            setFileBytes(path, good)
            flip(path, at: offset)
            #expect(throws: SnapshotError.corrupt(section: "header"), "byte \(offset)") { try SnapshotFile(path: path) }
        }
        // A header whose checksum is right but whose fields are not version-1 values.
        var bytes = good
        storeLE32(8192, into: &bytes, at: 40)  // page size
        storeLE32(SnapshotCRC32C.checksum(Array(bytes[0..<60])), into: &bytes, at: 60)
        setFileBytes(path, bytes)
        #expect(throws: SnapshotError.corrupt(section: "header")) { try SnapshotFile(path: path) }
    }

    @Test func rejectsEachCorruptSection() throws {
        let dir = ScratchDirectory()
        let path = dir.file("vm.snap")
        try Fixture.write(path, pages: 40)
        let good = fileBytes(path)
        let sections = try SnapshotFile(path: path).sections
        for e in sections where e.kind != .memory {
            for offset in [e.offset, e.offset + e.length / 2, e.end - 1] {
                setFileBytes(path, good)
                flip(path, at: Int(offset))
                #expect(throws: SnapshotError.corrupt(section: e.kind.name), "\(e.kind.name) byte \(offset)") {
                    try SnapshotFile(path: path)
                }
            }
        }
        // The section table itself.
        let tableOffset = sections.map(\.end).max()!
        for offset in [tableOffset, tableOffset + 45, UInt64(good.count - 1)] {
            setFileBytes(path, good)
            flip(path, at: Int(offset))
            #expect(throws: SnapshotError.corrupt(section: "section table")) { try SnapshotFile(path: path) }
        }
        // Padding before guest memory.
        let devices = sections.first { $0.kind == .devices }!
        let memory = sections.first { $0.kind == .memory }!
        #expect(memory.offset > devices.end)
        setFileBytes(path, good)
        flip(path, at: Int(memory.offset) - 1)
        #expect(throws: SnapshotError.corrupt(section: "padding")) { try SnapshotFile(path: path) }
        // Bytes appended after the end.
        setFileBytes(path, good + [0])
        #expect(throws: SnapshotError.corrupt(section: "file length")) { try SnapshotFile(path: path) }
    }

    @Test func rejectsCheckedButInconsistentSections() throws {
        let dir = ScratchDirectory()
        let path = dir.file("vm.snap")
        try Fixture.write(path, pages: 3)
        let good = fileBytes(path)
        let sections = try SnapshotFile(path: path).sections
        let tableOffset = Int(sections.map(\.end).max()!)
        // Metadata claiming another memory size, correctly checksummed: caught by the cross-check.
        let meta = sections.first { $0.kind == .metadata }!
        var bytes = good
        let json = String(decoding: bytes[Int(meta.offset)..<Int(meta.end)], as: UTF8.self)
        let edited = Array(json.replacingOccurrences(of: "\"memorySize\":12288", with: "\"memorySize\":12289").utf8)
        #expect(edited.count == Int(meta.length) && edited != Array(json.utf8))
        bytes.replaceSubrange(Int(meta.offset)..<Int(meta.end), with: edited)
        reseal(&bytes, sections: sections, tableOffset: tableOffset)
        setFileBytes(path, bytes)
        #expect(throws: SnapshotError.corrupt(section: "metadata")) { try SnapshotFile(path: path) }
        // Broken JSON, correctly checksummed.
        bytes = good
        bytes[Int(meta.offset)] = UInt8(ascii: "[")
        reseal(&bytes, sections: sections, tableOffset: tableOffset)
        setFileBytes(path, bytes)
        #expect(throws: SnapshotError.corrupt(section: "metadata")) { try SnapshotFile(path: path) }
    }

    @Test func rejectsTruncatedFiles() throws {
        let dir = ScratchDirectory()
        let path = dir.file("vm.snap")
        try Fixture.write(path, pages: Self.pages)
        let good = fileBytes(path)
        let memoryOffset = Int(try SnapshotFile(path: path).memoryOffset)
        for length in [64, 65, 100, memoryOffset, memoryOffset + 100 * 4096 + 17, good.count - 1] {
            #expect(truncate(path, off_t(length)) == 0)
            #expect(throws: SnapshotError.truncated(expected: UInt64(good.count), actual: UInt64(length))) {
                try SnapshotFile(path: path)
            }
            setFileBytes(path, good)
        }
    }

    @Test func fileShrinkingAfterOpenIsTruncatedNotACrash() throws {
        let dir = ScratchDirectory()
        let path = dir.file("vm.snap")
        try Fixture.write(path, pages: 64)
        let s = try SnapshotFile(path: path)
        let page = UnsafeMutableRawBufferPointer.allocate(byteCount: 4096, alignment: 4096)
        defer { page.deallocate() }
        try s.readPage(3, into: page)  // verifies chunk 0
        #expect(truncate(path, off_t(s.memoryOffset) + 10 * 4096) == 0)
        try s.readPage(4, into: page)  // chunk 0 is verified: just the page is read
        #expect(Array(page) == Fixture.page(4))
        #expect(throws: SnapshotError.truncated(expected: s.memoryOffset + 2 * 65536, actual: s.memoryOffset + 10 * 4096)) {
            try s.readPage(20, into: page)
        }
        #expect(throws: SnapshotError.truncated(expected: s.memoryOffset + 64 * 4096, actual: s.memoryOffset + 10 * 4096)) {
            try s.verifyMemory()
        }
    }

    @Test func corruptMemoryChunkIsCaughtAndOthersStillRead() throws {
        let dir = ScratchDirectory()
        let path = dir.file("vm.snap")
        try Fixture.write(path, pages: Self.pages)
        let memoryOffset = Int(try SnapshotFile(path: path).memoryOffset)
        flip(path, at: memoryOffset + 5 * 65536 + 3 * 4096 + 100)  // chunk 5, page 83

        let s = try SnapshotFile(path: path)  // memory is not read when opening
        let page = UnsafeMutableRawBufferPointer.allocate(byteCount: 4096, alignment: 4096)
        defer { page.deallocate() }
        // Any page of the bad chunk fails, not just the flipped one.
        for i in [80, 83, 95] {
            #expect(throws: SnapshotError.memoryChunkCorrupt(chunk: 5)) { try s.readPage(i, into: page) }
        }
        #expect(!s.isChunkVerified(5))
        for i in [0, 79, 96, Self.pages - 1] {
            try s.readPage(i, into: page)
            #expect(Array(page) == Fixture.page(i))
        }
        let chunk = UnsafeMutableRawBufferPointer.allocate(byteCount: 65536, alignment: 4096)
        defer { chunk.deallocate() }
        #expect(throws: SnapshotError.memoryChunkCorrupt(chunk: 5)) { try s.readChunk(5, into: chunk) }
        #expect(throws: SnapshotError.memoryChunkCorrupt(chunk: 5)) { try s.verifyMemory() }
        #expect(try s.corruptMemoryChunks() == [5])
        let size = Self.pages * 4096
        let ram = UnsafeMutableRawPointer.allocate(byteCount: size, alignment: 4096)
        defer { ram.deallocate() }
        #expect(throws: SnapshotError.memoryChunkCorrupt(chunk: 5)) { try s.restoreMemory(into: ram, size: UInt64(size)) }

        // The last, partial chunk is checked too.
        let t = try SnapshotFile(path: path)
        flip(path, at: memoryOffset + Self.pages * 4096 - 1)
        #expect(throws: SnapshotError.memoryChunkCorrupt(chunk: 64)) { try t.readPage(Self.pages - 1, into: page) }
        #expect(try t.corruptMemoryChunks() == [5, 64])
    }

    @Test func restoreRejectsOtherMemorySize() throws {
        let dir = ScratchDirectory()
        let path = dir.file("vm.snap")
        try Fixture.write(path, pages: 512)
        let s = try SnapshotFile(path: path)
        let ram = UnsafeMutableRawPointer.allocate(byteCount: 4 << 20, alignment: 4096)
        defer { ram.deallocate() }
        #expect(throws: SnapshotError.memorySizeMismatch(snapshot: 2 << 20, machine: 4 << 20)) {
            try s.restoreMemory(into: ram, size: 4 << 20)
        }
        #expect(throws: SnapshotError.memorySizeMismatch(snapshot: 2 << 20, machine: 1 << 20)) {
            try s.restoreMemory(into: ram, size: 1 << 20)
        }
        #expect(SnapshotError.memorySizeMismatch(snapshot: 2 << 20, machine: 4 << 20).description
            == "snapshot holds 2M of guest memory but the machine has 4M; create the machine with --memory 2M")
    }

    @Test func errorDescriptionsSayWhatAndWhatToDo() {
        let cases: [(SnapshotError, [String])] = [
            (.notASnapshot, ["not a Swiftvisor snapshot", "check the path"]),
            (.unsupportedVersion(found: 3, supported: 1), ["version 3", "newer swiftvisor"]),
            (.truncated(expected: 100, actual: 50), ["100", "50", "truncated"]),
            (.corrupt(section: "vcpus"), ["vcpus", "corrupt", "take a new snapshot"]),
            (.memoryChunkCorrupt(chunk: 2), ["chunk 2", "0x20000", "0x2ffff"]),
            (.ioFailed(path: "/x/y", errno: ENOSPC), ["/x/y", "No space left on device", "errno \(ENOSPC)"]),
        ]
        for (error, needles) in cases {
            for n in needles { #expect(error.description.contains(n), "\(error.description) lacks \(n)") }
        }
    }

    // MARK: Fuzzing

    /// Every byte of the file is covered by a check: any single-byte change is caught when
    /// opening, or (in guest memory) by the chunk checksums.
    @Test func singleByteFlipsAreAlwaysCaught() throws {
        let dir = ScratchDirectory()
        let path = dir.file("vm.snap")
        try Fixture.write(path, pages: 20, vcpus: Array(Fixture.vcpus.prefix(2)))
        let good = fileBytes(path)
        let memory = try SnapshotFile(path: path).sections.first { $0.kind == .memory }!
        var rng = SplitMix64(seed: 42)
        // Every byte outside guest memory, plus random bytes inside it.
        var offsets = Array(0..<Int(memory.offset)) + Array(Int(memory.end)..<good.count)
        offsets += (0..<300).map { _ in Int.random(in: Int(memory.offset)..<Int(memory.end), using: &rng) }
        setFileBytes(path, good)
        for offset in offsets {
            let mask = UInt8.random(in: 1...255, using: &rng)
            flip(path, at: offset, mask: mask)
            defer { flip(path, at: offset, mask: mask) }
            let s: SnapshotFile
            do {
                s = try SnapshotFile(path: path)
            } catch {
                continue  // a typed SnapshotError: fine
            }
            #expect((Int(memory.offset)..<Int(memory.end)).contains(offset), "flip at \(offset) went unnoticed when opening")
            let chunk = (offset - Int(memory.offset)) / 65536
            #expect(throws: SnapshotError.memoryChunkCorrupt(chunk: chunk)) { try s.verifyMemory() }
        }
        #expect(fileBytes(path) == good)
    }

    @Test func truncationsAreAlwaysCaught() throws {
        let dir = ScratchDirectory()
        let path = dir.file("vm.snap")
        try Fixture.write(path, pages: 20, vcpus: [Fixture.vcpu(0)])
        let good = fileBytes(path)
        var rng = SplitMix64(seed: 7)
        let lengths = Array(0..<200) + (0..<300).map { _ in Int.random(in: 0..<good.count, using: &rng) } + [good.count - 1]
        for length in lengths {
            setFileBytes(path, Array(good[0..<length]))
            #expect(throws: SnapshotError.self, "truncated to \(length)") { try SnapshotFile(path: path) }
        }
    }

    /// Random damage inside sections with every checksum recomputed, so the decoders behind
    /// the checksums see it: opening must fail with a SnapshotError or succeed, never crash.
    @Test func resealedDamageNeverCrashes() throws {
        let dir = ScratchDirectory()
        let path = dir.file("vm.snap")
        try Fixture.write(path, pages: 20)
        let good = fileBytes(path)
        let sections = try SnapshotFile(path: path).sections
        let tableOffset = Int(sections.map(\.end).max()!)
        let targets = sections.filter { $0.kind != .memory && $0.length > 0 }
        var rng = SplitMix64(seed: FuzzBudget.seed(0xF00D))
        var opened = 0, rejected = 0
        let iterations = FuzzBudget.iterations(standard: 400)
        for _ in 0..<iterations {
            var bytes = good
            let e = targets.randomElement(using: &rng)!
            for _ in 0..<Int.random(in: 1...3, using: &rng) {
                let at = Int.random(in: Int(e.offset)..<Int(e.end), using: &rng)
                bytes[at] = Bool.random(using: &rng) ? UInt8.random(in: 0...255, using: &rng) : bytes[at] ^ 0x80
            }
            reseal(&bytes, sections: sections, tableOffset: tableOffset)
            setFileBytes(path, bytes)
            do {
                let s = try SnapshotFile(path: path)
                opened += 1
                _ = try? s.corruptMemoryChunks()
            } catch {
                rejected += 1
            }
        }
        #expect(opened + rejected == iterations && rejected > 0)
    }

    // MARK: Throughput

    /// `SNAPSHOT_BENCH=1 swift test --filter SnapshotFile`: write, verify and restore 256 MiB.
    @Test(.enabled(if: ProcessInfo.processInfo.environment["SNAPSHOT_BENCH"] != nil))
    func throughput256MiB() throws {
        let dir = ScratchDirectory()
        let path = dir.file("big.snap")
        let size = 256 << 20
        let pages = size / 4096
        let ram = UnsafeMutableRawPointer.allocate(byteCount: size, alignment: 4096)
        defer { ram.deallocate() }
        for i in 0..<pages { Fixture.fill(page: i, UnsafeMutableRawBufferPointer(start: ram + i * 4096, count: 4096)) }
        let report = try SnapshotWriter.write(to: path, metadata: Fixture.metadata(pages: pages, vcpus: 4),
                                              vcpus: Fixture.vcpus, devices: Fixture.devices, pageCount: pages) { i, buffer in
            buffer.baseAddress!.copyMemory(from: ram + i * 4096, byteCount: 4096)
        }
        func seconds(_ body: () throws -> Void) rethrows -> Double {
            let clock = ContinuousClock()
            let t = clock.measure { try? body() }
            return Double(t.components.seconds) + Double(t.components.attoseconds) / 1e18
        }
        let s = try SnapshotFile(path: path)
        let verify = seconds { try? s.verifyMemory() }
        memset(ram, 0, size)
        let restore = seconds { try? s.restoreMemory(into: ram, size: UInt64(size)) }
        #expect(Array(UnsafeRawBufferPointer(start: ram + 12345 * 4096, count: 4096)) == Fixture.page(12345))
        let mib = Double(size) / Double(1 << 20)
        print("snapshot 256 MiB: write \(Int(mib / report.seconds)) MiB/s (\(report.seconds) s incl. fsync), "
              + "verify \(Int(mib / verify)) MiB/s, restore+verify \(Int(mib / restore)) MiB/s")
    }
}
