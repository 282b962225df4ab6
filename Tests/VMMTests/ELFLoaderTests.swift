import Testing
import VirtCore
@testable import VMM

@Suite struct ELFLoaderTests {
    func image(_ b: ELFBuilder) throws -> ELFImage { try ELFImage(bytes: b.build()) }

    @Test func loadsSegmentsAndZeroesBSS() throws {
        var b = ELFBuilder(code: [0x90, 0x90, 0xF4])
        b.segments.append(.init(paddr: 0x20_0000, bytes: [1, 2, 3, 4], memsz: 0x2000))
        let img = try image(b)
        #expect(img.entry == 0x10_0000)
        let m = try GuestMemory(size: 4 << 20)
        try m.fill(0xAA, at: 0x20_0000, count: 0x2000)
        try img.load(into: m)
        #expect(try m.read(at: 0x10_0000, count: 3) == [0x90, 0x90, 0xF4])
        #expect(try m.read(at: 0x20_0000, count: 6) == [1, 2, 3, 4, 0, 0])
        #expect(try m.load(UInt8.self, at: 0x20_1FFF) == 0)
    }

    @Test func rejectsMalformedHeaders() {
        #expect(throws: ELFLoadError.tooSmall(size: 10)) { _ = try ELFImage(bytes: [UInt8](repeating: 0, count: 10)) }
        var b = ELFBuilder(); b.magic = [0x7F, 0x45, 0x4C, 0x47]
        #expect(throws: ELFLoadError.badMagic) { _ = try image(b) }
        b = ELFBuilder(); b.classByte = 1
        #expect(throws: ELFLoadError.notELF64(classByte: 1)) { _ = try image(b) }
        b = ELFBuilder(); b.dataByte = 2
        #expect(throws: ELFLoadError.notLittleEndian) { _ = try image(b) }
        b = ELFBuilder(); b.machine = 183
        #expect(throws: ELFLoadError.wrongMachine(183)) { _ = try image(b) }
        b = ELFBuilder(); b.type = 3
        #expect(throws: ELFLoadError.notExecutable(type: 3)) { _ = try image(b) }
        b = ELFBuilder(); b.phoffOverride = 1 << 40
        #expect(throws: ELFLoadError.badProgramHeaderTable) { _ = try image(b) }
        b = ELFBuilder(); b.phnumOverride = 500
        #expect(throws: ELFLoadError.badProgramHeaderTable) { _ = try image(b) }
    }

    @Test func rejectsBadSegments() {
        var b = ELFBuilder(); b.segments[0].offsetOverride = 1 << 20
        #expect(throws: ELFLoadError.segmentOutsideFile(index: 0)) { _ = try image(b) }
        b = ELFBuilder(); b.segments[0].fileszOverride = UInt64.max
        #expect(throws: ELFLoadError.segmentOutsideFile(index: 0)) { _ = try image(b) }
        b = ELFBuilder(code: [1, 2, 3, 4]); b.segments[0].memsz = 2
        #expect(throws: ELFLoadError.segmentFileSizeExceedsMemorySize(index: 0)) { _ = try image(b) }
        b = ELFBuilder(); b.phnumOverride = 0
        #expect(throws: ELFLoadError.noLoadableSegments) { _ = try image(b) }
        b = ELFBuilder(); b.entry = 0x50_0000
        #expect(throws: ELFLoadError.entryNotLoaded(entry: 0x50_0000)) { _ = try image(b) }
    }

    @Test func rejectsPlacementOutsideRAMOrOverVMMArea() throws {
        let m = try GuestMemory(size: 4 << 20)
        let high = try image(ELFBuilder(code: [0xF4], at: 0x3F_FFFF + 1))
        #expect(throws: ELFLoadError.segmentOutsideRAM(index: 0, start: 0x40_0000, end: 0x40_0001, ramSize: 4 << 20)) {
            try high.load(into: m)
        }
        var straddle = ELFBuilder(code: [0xF4], at: 0x3F_F000); straddle.segments[0].memsz = 0x2000
        #expect(throws: ELFLoadError.self) { try image(straddle).load(into: m) }
        var wrap = ELFBuilder(code: [0xF4], at: UInt64.max - 0xF); wrap.segments[0].memsz = 0x100
        #expect(throws: ELFLoadError.self) { try image(wrap).load(into: m) }
        let low = try image(ELFBuilder(code: [0xF4], at: 0x2000))
        #expect(throws: ELFLoadError.segmentOverlapsReserved(index: 0, start: 0x2000, reservedEnd: 0x10_0000)) {
            try low.load(into: m)
        }
    }

    @Test func failedLoadWritesNothing() throws {
        var b = ELFBuilder(code: [0x11, 0x22])
        b.segments.append(.init(paddr: 0x80_0000, bytes: [0x33], memsz: nil))  // second segment past RAM
        let m = try GuestMemory(size: 4 << 20)
        #expect(throws: ELFLoadError.self) { try image(b).load(into: m) }
        #expect(try m.read(at: 0x10_0000, count: 2) == [0, 0])
    }

    @Test func errorMessagesSayWhatToDo() {
        #expect(ELFLoadError.segmentOutsideRAM(index: 1, start: 0x100000, end: 0x5000000, ramSize: 0x4000000).description
            .contains("--memory"))
        #expect(ELFLoadError.wrongMachine(40).description.contains("not x86-64"))
    }
}

@Suite struct MemorySizeTests {
    @Test func parsesUnits() {
        #expect(MemorySize.parse("64M") == 64 << 20)
        #expect(MemorySize.parse("1G") == 1 << 30)
        #expect(MemorySize.parse("512k") == 512 << 10)
        #expect(MemorySize.parse("2MiB") == 2 << 20)
        #expect(MemorySize.parse("3mb") == 3 << 20)
        #expect(MemorySize.parse("4096") == 4096)
        #expect(MemorySize.parse("") == nil)
        #expect(MemorySize.parse("M") == nil)
        #expect(MemorySize.parse("12X") == nil)
        #expect(MemorySize.parse("-1M") == nil)
        #expect(MemorySize.parse("99999999999999999999G") == nil)
        #expect(MemorySize.parse("17179869184G") == nil)  // overflows UInt64
    }

    @Test func formatsWholeUnits() {
        #expect(MemorySize.format(64 << 20) == "64M")
        #expect(MemorySize.format(3 << 30) == "3G")
        #expect(MemorySize.format(1000) == "1000")
    }
}

@Suite struct BootLayoutTests {
    @Test func writesBootInfoPageTablesAndCommandLine() throws {
        let m = try GuestMemory(size: 64 << 20)
        try BootLayout.prepare(memory: m, vcpuCount: 2, commandLine: "count=5", hypercall: .portDoorbell(0xF6))
        #expect(try m.load(UInt32.self, at: 0x2000) == 0x4942_5653)
        #expect(try m.load(UInt64.self, at: 0x2008) == 64 << 20)
        #expect(try m.load(UInt32.self, at: 0x2010) == 2)
        #expect(try m.load(UInt32.self, at: 0x2014) == 1)
        #expect(try m.load(UInt16.self, at: 0x2018) == 0xF6)
        #expect(try m.load(UInt32.self, at: 0x2020) == 7)
        #expect(try m.read(at: 0x3000, count: 8) == Array("count=5\0".utf8))
        // Identity map covers RAM and the MMIO hole up to 4 GiB.
        for gva: UInt64 in [0x10_0000, 0x3FF_FFFF, 0xD000_0000, 0xFFFF_FFFF] {
            #expect(PageTableWalker.translate(gva, cr3: BootLayout.pml4Address, memory: m) == gva)
        }
        #expect(PageTableWalker.translate(1 << 32, cr3: BootLayout.pml4Address, memory: m) == nil)
    }

    @Test func entryStateFollowsTheABI() {
        let s = BootLayout.initialState(vcpu: 3, entry: 0x10_0040)
        #expect(s.rip == 0x10_0040)
        #expect(s.rsi == 3)
        #expect(s.rdi == 0x2000)
        #expect(s.rsp == 0xA0000 - 3 * 0x4000)
        #expect(s.cs.l && s.cs.selector == 8 && s.cpl == 0)
        #expect(s.efer & 0x400 != 0)  // LMA
    }
}
