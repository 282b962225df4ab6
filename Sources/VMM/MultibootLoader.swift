import VirtCore

public enum MultibootError: Error, Equatable, Sendable, CustomStringConvertible {
    case noHeader
    case badHeader(String)
    case badELF(String)
    case doesNotFit(String)

    public var description: String {
        switch self {
        case .noHeader: return "no multiboot (v1) header in the first 8 KiB"
        case let .badHeader(why): return "multiboot header: \(why)"
        case let .badELF(why): return "multiboot ELF32 kernel: \(why)"
        case let .doesNotFit(what): return "\(what) does not fit in guest RAM"
        }
    }
}

/// A multiboot (v1) kernel: an ELF32 image, or any image whose header carries the a.out
/// kludge's load addresses. Loaded into RAM with its multiboot information (memory sizes,
/// command line, modules, memory map) and entered the way GRUB and QEMU enter it: 32-bit
/// protected mode, flat segments, paging off, EAX = 0x2BADB002, EBX = the information.
public struct MultibootKernel: Sendable {
    public static let headerMagic: UInt32 = 0x1BAD_B002
    public static let bootloaderMagic: UInt32 = 0x2BAD_B002

    /// Where the loader puts its structures (below the EBDA, above the real-mode IVT and
    /// the page an SMP trampoline uses at 0).
    static let infoAddress: UInt64 = 0x9000
    static let memoryMapAddress: UInt64 = 0x9100
    static let moduleListAddress: UInt64 = 0x9400
    static let stringsAddress: UInt64 = 0x9800
    static let stringsEnd: UInt64 = 0x9F000

    struct Piece: Sendable { var address: UInt64; var bytes: ArraySlice<UInt8>; var memorySize: UInt64 }
    let pieces: [Piece]
    public let entry: UInt64
    /// The end of the highest loaded byte (modules go above it).
    let end: UInt64

    /// Whether `bytes` carry a multiboot v1 header.
    public static func isMultiboot(_ bytes: [UInt8]) -> Bool { findHeader(bytes) != nil }

    private static func word(_ b: [UInt8], _ at: Int) -> UInt32 {
        guard at >= 0, at + 4 <= b.count else { return 0 }
        return UInt32(b[at]) | UInt32(b[at + 1]) << 8 | UInt32(b[at + 2]) << 16 | UInt32(b[at + 3]) << 24
    }

    private static func half(_ b: [UInt8], _ at: Int) -> UInt16 {
        guard at >= 0, at + 2 <= b.count else { return 0 }
        return UInt16(b[at]) | UInt16(b[at + 1]) << 8
    }

    private static func findHeader(_ b: [UInt8]) -> Int? {
        var at = 0
        while at + 12 <= min(b.count, 8192) {
            let magic = word(b, at), flags = word(b, at + 4), check = word(b, at + 8)
            if magic == headerMagic && magic &+ flags &+ check == 0 { return at }
            at += 4
        }
        return nil
    }

    public init(bytes b: [UInt8]) throws(MultibootError) {
        guard let h = Self.findHeader(b) else { throw .noHeader }
        let flags = Self.word(b, h + 4)
        if flags & 0xFFFC != 0 && flags & 0x10000 == 0 {
            // Bits 2…15 ask for video modes and the like, which this loader cannot promise.
            if flags & 0x4 != 0 { throw .badHeader("video mode request (flag 2) is not supported") }
        }
        if flags & 0x10000 != 0 {
            // The a.out kludge: the header says where the image goes.
            let headerAddress = UInt64(Self.word(b, h + 12)), loadAddress = UInt64(Self.word(b, h + 16))
            let loadEnd = UInt64(Self.word(b, h + 20)), bssEnd = UInt64(Self.word(b, h + 24))
            entry = UInt64(Self.word(b, h + 28))
            guard headerAddress >= loadAddress, UInt64(h) >= headerAddress - loadAddress else { throw .badHeader("header address below load address") }
            let fileStart = h - Int(headerAddress - loadAddress)
            let length = loadEnd == 0 ? UInt64(b.count - fileStart) : loadEnd &- loadAddress
            guard loadEnd == 0 || loadEnd > loadAddress, UInt64(fileStart) + length <= UInt64(b.count) else { throw .badHeader("load range outside the file") }
            let memorySize = bssEnd > loadAddress + length ? bssEnd - loadAddress : length
            pieces = [Piece(address: loadAddress, bytes: b[fileStart..<(fileStart + Int(length))], memorySize: memorySize)]
            end = loadAddress + memorySize
            return
        }
        guard b.count >= 52, b[0] == 0x7F, b[1] == 0x45, b[2] == 0x4C, b[3] == 0x46 else { throw .badELF("not an ELF file (and no a.out kludge)") }
        guard b[4] == 1 else { throw .badELF("not ELF32") }
        guard b[5] == 1, Self.half(b, 18) == 3 else { throw .badELF("not little-endian i386") }
        entry = UInt64(Self.word(b, 24))
        let phoff = Int(Self.word(b, 28)), phentsize = Int(Self.half(b, 42)), phnum = Int(Self.half(b, 44))
        guard phentsize >= 32, phnum > 0, phoff + phnum * phentsize <= b.count else { throw .badELF("program headers outside the file") }
        var pieces: [Piece] = []
        var end: UInt64 = 0
        for k in 0..<phnum {
            let p = phoff + k * phentsize
            guard Self.word(b, p) == 1 else { continue }  // PT_LOAD
            let offset = Int(Self.word(b, p + 4)), paddr = UInt64(Self.word(b, p + 12))
            let fileSize = Int(Self.word(b, p + 16)), memorySize = UInt64(Self.word(b, p + 20))
            guard offset + fileSize <= b.count, UInt64(fileSize) <= memorySize else { throw .badELF("segment \(k) outside the file") }
            pieces.append(Piece(address: paddr, bytes: b[offset..<(offset + fileSize)], memorySize: memorySize))
            end = max(end, paddr + memorySize)
        }
        guard !pieces.isEmpty else { throw .badELF("no loadable segment") }
        self.pieces = pieces
        self.end = end
    }

    /// Loads the kernel and modules and writes the multiboot information. Returns the
    /// boot CPU's entry state. `modules`: (contents, command line) in order.
    public func load(into memory: GuestMemory, commandLine: String, modules: [(bytes: [UInt8], commandLine: String)]) throws -> VCPUState {
        let ram = memory.size
        for p in pieces {
            guard p.address >= 0x10_0000 || p.address + p.memorySize <= Self.infoAddress,
                  p.address + p.memorySize <= ram else { throw MultibootError.doesNotFit("kernel segment at 0x\(String(p.address, radix: 16))") }
            try memory.write(p.bytes, at: p.address)
            let bss = p.memorySize - UInt64(p.bytes.count)
            if bss > 0 { try memory.zero(at: p.address + UInt64(p.bytes.count), count: Int(bss)) }
        }
        var strings = Self.stringsAddress
        func putString(_ s: String) throws -> UInt64 {
            let bytes = Array(s.utf8) + [0]
            guard strings + UInt64(bytes.count) <= Self.stringsEnd else { throw MultibootError.doesNotFit("command lines") }
            let at = strings
            try memory.write(bytes, at: at)
            strings += UInt64(bytes.count)
            return at
        }
        // Modules: page-aligned, above the kernel.
        var next = (end + 0xFFF) & ~0xFFF
        guard modules.count <= 64 else { throw MultibootError.doesNotFit("more than 64 modules") }
        for (k, module) in modules.enumerated() {
            guard next + UInt64(module.bytes.count) <= ram else { throw MultibootError.doesNotFit("module \(k)") }
            try memory.write(module.bytes, at: next)
            let entry = Self.moduleListAddress + UInt64(k) * 16
            try memory.store(UInt32(next), at: entry)
            try memory.store(UInt32(next + UInt64(module.bytes.count)), at: entry + 4)
            try memory.store(UInt32(try putString(module.commandLine)), at: entry + 8)
            try memory.store(UInt32(0), at: entry + 12)
            next = (next + UInt64(module.bytes.count) + 0xFFF) & ~0xFFF
        }
        // The memory map (the e820 view): conventional memory, and everything from 1 MiB.
        let map: [(UInt64, UInt64, UInt32)] = [(0, 0x9_FC00, 1), (0xF_0000, 0x1_0000, 2), (0x10_0000, ram - 0x10_0000, 1)]
        for (k, (base, length, type)) in map.enumerated() {
            let e = Self.memoryMapAddress + UInt64(k) * 24
            try memory.store(UInt32(20), at: e)
            try memory.store(base, at: e + 4)
            try memory.store(length, at: e + 12)
            try memory.store(type, at: e + 20)
        }
        let info = Self.infoAddress
        try memory.zero(at: info, count: 0x100)
        // mem (bit 0), cmdline (2), mods (3), mmap (6).
        try memory.store(UInt32(1 | 4 | 8 | 64), at: info)
        try memory.store(UInt32(640), at: info + 4)
        try memory.store(UInt32(min((ram - 0x10_0000) >> 10, 0xFFFF_FFFF)), at: info + 8)
        try memory.store(UInt32(try putString(commandLine)), at: info + 16)
        try memory.store(UInt32(modules.count), at: info + 20)
        try memory.store(UInt32(Self.moduleListAddress), at: info + 24)
        try memory.store(UInt32(map.count * 24), at: info + 44)
        try memory.store(UInt32(Self.memoryMapAddress), at: info + 48)
        return Self.entryState(entry: entry, info: info)
    }

    /// 32-bit protected mode, flat 4 GiB segments, paging and interrupts off.
    static func entryState(entry: UInt64, info: UInt64) -> VCPUState {
        var s = VCPUState()
        s.rip = entry
        s.rax = UInt64(bootloaderMagic)
        s.rbx = info
        s.rflags = 0x2
        s.cs = SegmentRegister(selector: 0x10, base: 0, limit: 0xFFFF_FFFF, type: 0xB, present: true, dpl: 0, db: true, s: true, l: false, g: true)
        let data = SegmentRegister(selector: 0x18, base: 0, limit: 0xFFFF_FFFF, type: 0x3, present: true, dpl: 0, db: true, s: true, l: false, g: true)
        s.ds = data; s.es = data; s.fs = data; s.gs = data; s.ss = data
        s.tr = SegmentRegister(selector: 0, base: 0, limit: 0xFFFF, type: 0xB, present: true)
        s.ldtr = SegmentRegister(selector: 0, base: 0, limit: 0xFFFF, type: 0x2, present: true)
        s.gdt = DescriptorTableRegister(base: 0, limit: 0xFFFF)
        s.idt = DescriptorTableRegister(base: 0, limit: 0x3FF)
        s.cr0 = 0x11  // PE | ET
        return s
    }

    /// An application processor as INIT then SIPI leave it: real mode at `vector << 12`.
    public static func startupState(vector: UInt8) -> VCPUState {
        var s = VCPUState()
        s.rip = 0
        s.rflags = 0x2
        s.cs = SegmentRegister(selector: UInt16(vector) << 8, base: UInt64(vector) << 12, limit: 0xFFFF, type: 0xB, present: true, s: true)
        let data = SegmentRegister(selector: 0, base: 0, limit: 0xFFFF, type: 0x3, present: true, s: true)
        s.ds = data; s.es = data; s.fs = data; s.gs = data; s.ss = data
        s.tr = SegmentRegister(selector: 0, base: 0, limit: 0xFFFF, type: 0xB, present: true)
        s.ldtr = SegmentRegister(selector: 0, base: 0, limit: 0xFFFF, type: 0x2, present: true)
        s.gdt = DescriptorTableRegister(base: 0, limit: 0xFFFF)
        s.idt = DescriptorTableRegister(base: 0, limit: 0x3FF)
        s.cr0 = 0x6000_0010
        s.apicBase = 0xFEE0_0800
        return s
    }
}
