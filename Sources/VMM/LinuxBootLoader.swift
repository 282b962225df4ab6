import VirtCore

public enum LinuxBootError: Error, Equatable, Sendable, CustomStringConvertible {
    case badSetupHeader(String)
    case badELF(String)
    case doesNotFit(String)

    public var description: String {
        switch self {
        case let .badSetupHeader(why): return "Linux bzImage setup header: \(why)"
        case let .badELF(why): return "Linux vmlinux ELF: \(why)"
        case let .doesNotFit(what): return "\(what) does not fit in guest RAM (try a larger --memory)"
        }
    }
}

/// A Linux kernel booted through the x86 boot protocol's 64-bit entry
/// (Documentation/arch/x86/boot.rst): a bzImage — its protected-mode part loaded at 1 MiB
/// and entered at `startup_64`, 0x200 past it — or an uncompressed vmlinux ELF entered at
/// its physical entry point. Either way in long mode with identity-mapped page tables
/// (the low 4 GiB), a flat GDT (__BOOT_CS 0x10, __BOOT_DS 0x18), interrupts off and
/// RSI = the boot_params ("zero page") holding the setup header, e820 map, command line
/// and initrd.
public struct LinuxKernel: Sendable {
    enum Format: Sendable, Equatable { case bzImage, vmlinux }

    /// Where the loader puts its structures, all in conventional memory below the EBDA.
    static let gdtAddress: UInt64 = 0x500
    static let bootParamsAddress: UInt64 = 0x7000
    static let pageTablesAddress: UInt64 = 0x9000  // PML4, PDPT, four page directories
    static let commandLineAddress: UInt64 = 0x2_0000
    static let bzImageLoadAddress: UInt64 = 0x10_0000
    /// The end of conventional memory (the EBDA and the BIOS area above are reserved).
    static let conventionalEnd: UInt64 = 0x9_FC00
    /// The MP table lives in the BIOS area, which the e820 map reserves.
    static let biosAreaStart: UInt64 = 0xF_0000

    let format: Format
    /// The setup header (boot_params 0x1F1 …), copied into the zero page (bzImage only).
    let setupHeader: [UInt8]
    /// (guest-physical address, bytes, memory size) of what is loaded.
    let pieces: [(address: UInt64, bytes: ArraySlice<UInt8>, memorySize: UInt64)]
    public let entry: UInt64
    /// RAM the kernel needs from its load address up (bzImage: pref_address + init_size).
    let footprintEnd: UInt64
    let initrdAddressMax: UInt64
    let commandLineMax: Int

    /// Whether `bytes` look like a bzImage (boot flag and "HdrS"); such an image is then
    /// either loaded or rejected with the reason, never booted another way.
    public static func isBzImage(_ b: [UInt8]) -> Bool {
        b.count >= 0x206 && u16(b, 0x1FE) == 0xAA55 && u32(b, 0x202) == 0x5372_6448
    }

    /// Whether `bytes` are an x86-64 ELF (a vmlinux).
    public static func isELF64(_ b: [UInt8]) -> Bool {
        b.count >= 20 && b[0] == 0x7F && b[1] == 0x45 && b[2] == 0x4C && b[3] == 0x46 && b[4] == 2 && u16(b, 18) == 62
    }

    static func u16(_ b: [UInt8], _ at: Int) -> UInt16 {
        guard at >= 0, at + 2 <= b.count else { return 0 }
        return UInt16(b[at]) | UInt16(b[at + 1]) << 8
    }
    static func u32(_ b: [UInt8], _ at: Int) -> UInt32 {
        guard at >= 0, at + 4 <= b.count else { return 0 }
        return UInt32(u16(b, at)) | UInt32(u16(b, at + 2)) << 16
    }
    static func u64(_ b: [UInt8], _ at: Int) -> UInt64 {
        UInt64(u32(b, at)) | UInt64(u32(b, at + 4)) << 32
    }

    public init(bytes b: [UInt8]) throws(LinuxBootError) {
        if Self.isBzImage(b) { try self.init(bzImage: b) } else if Self.isELF64(b) { try self.init(vmlinux: b) } else {
            throw .badSetupHeader("neither a bzImage (no boot flag 0xAA55 and \"HdrS\") nor an x86-64 ELF")
        }
    }

    private init(bzImage b: [UInt8]) throws(LinuxBootError) {
        let version = Self.u16(b, 0x206)
        // 2.12: xloadflags, and with it the 64-bit entry point.
        guard version >= 0x020C else { throw .badSetupHeader("boot protocol \(version >> 8).\(version & 0xFF) is older than 2.12 (no 64-bit entry)") }
        let headerEnd = 0x202 + Int(b[0x201])
        guard headerEnd > 0x264, headerEnd <= 0x400, headerEnd <= b.count else { throw .badSetupHeader("header length \(headerEnd - 0x1F1) is out of range") }
        var setupSectors = Int(b[0x1F1])
        if setupSectors == 0 { setupSectors = 4 }
        let kernelOffset = (setupSectors + 1) * 512
        guard kernelOffset < b.count else { throw .badSetupHeader("\(setupSectors) setup sectors but the file has \(b.count) bytes") }
        let xloadflags = Self.u16(b, 0x236)
        guard xloadflags & 1 != 0 else { throw .badSetupHeader("no 64-bit entry point (XLF_KERNEL_64 clear)") }
        guard b[0x211] & 1 != 0 else { throw .badSetupHeader("not a bzImage (LOADED_HIGH clear)") }
        let payload = UInt64(Self.u32(b, 0x248)), payloadLength = UInt64(Self.u32(b, 0x24C))
        guard payloadLength > 0, payload + payloadLength <= UInt64(b.count - kernelOffset) else {
            throw .badSetupHeader("compressed payload [\(payload), +\(payloadLength)) is outside the kernel")
        }
        let alignment = UInt64(Self.u32(b, 0x230))
        guard alignment != 0, alignment & (alignment - 1) == 0 else { throw .badSetupHeader("kernel_alignment \(alignment) is not a power of two") }
        let initSize = UInt64(Self.u32(b, 0x260))
        let protectedModeSize = UInt64(b.count - kernelOffset)
        guard initSize >= protectedModeSize else { throw .badSetupHeader("init_size \(initSize) is smaller than the kernel (\(protectedModeSize) bytes)") }
        let preferred = Self.u64(b, 0x258)
        guard preferred < 1 << 40 else { throw .badSetupHeader("pref_address 0x\(String(preferred, radix: 16)) is out of range") }
        format = .bzImage
        setupHeader = Array(b[0x1F1..<headerEnd])
        pieces = [(Self.bzImageLoadAddress, b[kernelOffset...], protectedModeSize)]
        entry = Self.bzImageLoadAddress + 0x200
        // A relocatable kernel decompresses at its load address aligned up, or at
        // pref_address if that is higher; a fixed one at pref_address.
        footprintEnd = max(preferred, Self.bzImageLoadAddress + protectedModeSize) + initSize
        initrdAddressMax = UInt64(Self.u32(b, 0x22C))
        commandLineMax = version >= 0x0206 ? Int(Self.u32(b, 0x238)) : 255
    }

    private init(vmlinux b: [UInt8]) throws(LinuxBootError) {
        guard b.count >= 64, b[5] == 1 else { throw .badELF("not a little-endian ELF64 header") }
        let virtualEntry = Self.u64(b, 24)
        let phoff = Int(clamping: Self.u64(b, 32)), phentsize = Int(Self.u16(b, 54)), phnum = Int(Self.u16(b, 56))
        guard phentsize >= 56, phnum > 0, phoff <= b.count, phnum * phentsize <= b.count - phoff else { throw .badELF("program headers outside the file") }
        var pieces: [(address: UInt64, bytes: ArraySlice<UInt8>, memorySize: UInt64)] = []
        var entry: UInt64?
        var end: UInt64 = 0
        for k in 0..<phnum {
            let h = phoff + k * phentsize
            guard Self.u32(b, h) == 1 else { continue }  // PT_LOAD
            let offset = Self.u64(b, h + 8), vaddr = Self.u64(b, h + 16), paddr = Self.u64(b, h + 24)
            let fileSize = Self.u64(b, h + 32), memorySize = Self.u64(b, h + 40)
            guard offset <= UInt64(b.count), fileSize <= UInt64(b.count) - offset, fileSize <= memorySize,
                  paddr < 1 << 40, memorySize < 1 << 40 else { throw .badELF("segment \(k) is outside the file or too large") }
            pieces.append((paddr, b[Int(offset)..<Int(offset + fileSize)], memorySize))
            if virtualEntry >= vaddr, virtualEntry - vaddr < memorySize { entry = paddr + (virtualEntry - vaddr) }
            else if virtualEntry >= paddr, virtualEntry - paddr < memorySize { entry = virtualEntry }
            end = max(end, paddr + memorySize)
        }
        guard !pieces.isEmpty else { throw .badELF("no loadable segment") }
        guard let entry else { throw .badELF("entry 0x\(String(virtualEntry, radix: 16)) is in no loadable segment") }
        format = .vmlinux
        setupHeader = []
        self.pieces = pieces
        self.entry = entry
        footprintEnd = end
        initrdAddressMax = 0x7FFF_FFFF
        commandLineMax = 2047
    }

    /// The e820 map: conventional memory, the EBDA and BIOS area reserved, RAM from 1 MiB.
    static func memoryMap(ramSize: UInt64) -> [(base: UInt64, length: UInt64, type: UInt32)] {
        [(0, conventionalEnd, 1), (conventionalEnd, 0xA_0000 - conventionalEnd, 2),
         (biosAreaStart, 0x10_0000 - biosAreaStart, 2), (0x10_0000, ramSize - 0x10_0000, 1)]
    }

    /// Loads the kernel, the initrd and the zero page; returns the boot CPU's entry state.
    public func load(into memory: GuestMemory, commandLine: String, initrd: [UInt8]?) throws -> VCPUState {
        let ram = memory.size
        guard footprintEnd <= ram else { throw LinuxBootError.doesNotFit("the kernel (it needs RAM up to 0x\(String(footprintEnd, radix: 16)))") }
        for p in pieces {
            guard p.address >= 0x10_0000, p.address + p.memorySize <= ram else { throw LinuxBootError.doesNotFit("kernel segment at 0x\(String(p.address, radix: 16))") }
            try memory.write(p.bytes, at: p.address)
            let bss = p.memorySize - UInt64(p.bytes.count)
            if bss > 0 { try memory.zero(at: p.address + UInt64(p.bytes.count), count: Int(bss)) }
        }
        let cmd = Array(commandLine.utf8)
        guard cmd.count <= commandLineMax else { throw LinuxBootError.doesNotFit("a command line of \(cmd.count) bytes (the kernel takes \(commandLineMax))") }
        try memory.write(cmd + [0], at: Self.commandLineAddress)

        let zp = Self.bootParamsAddress
        try memory.zero(at: zp, count: 0x1000)
        if format == .bzImage {
            try memory.write(setupHeader, at: zp + 0x1F1)
            try memory.store(UInt8(0xFF), at: zp + 0x210)  // type_of_loader: undefined
            let loadflags: UInt8 = try memory.load(at: zp + 0x211)
            try memory.store(loadflags | 0x80, at: zp + 0x211)  // CAN_USE_HEAP
            try memory.store(UInt16(0xFE00), at: zp + 0x224)  // heap_end_ptr
            try memory.store(UInt32(Self.bzImageLoadAddress), at: zp + 0x214)  // code32_start
        } else {
            try memory.store(UInt16(0xAA55), at: zp + 0x1FE)
            try memory.store(UInt32(0x5372_6448), at: zp + 0x202)
            try memory.store(UInt16(0x020F), at: zp + 0x206)
            try memory.store(UInt8(0xFF), at: zp + 0x210)
        }
        try memory.store(UInt32(Self.commandLineAddress), at: zp + 0x228)  // cmd_line_ptr
        try memory.store(UInt32(cmd.count), at: zp + 0x238)  // cmdline_size
        if let initrd, !initrd.isEmpty {
            // As high as the kernel allows, page-aligned, above what the kernel occupies.
            let top = min(ram, initrdAddressMax &+ 1)
            let size = UInt64(initrd.count)
            guard size <= top else { throw LinuxBootError.doesNotFit("the initrd (\(size) bytes)") }
            let at = (top - size) & ~0xFFF
            guard at >= footprintEnd else { throw LinuxBootError.doesNotFit("the initrd (\(size) bytes) beside the kernel") }
            try memory.write(initrd, at: at)
            try memory.store(UInt32(truncatingIfNeeded: at), at: zp + 0x218)  // ramdisk_image
            try memory.store(UInt32(truncatingIfNeeded: size), at: zp + 0x21C)  // ramdisk_size
            try memory.store(UInt32(truncatingIfNeeded: at >> 32), at: zp + 0x0C0)  // ext_ramdisk_image
            try memory.store(UInt32(truncatingIfNeeded: size >> 32), at: zp + 0x0C4)  // ext_ramdisk_size
        }
        let map = Self.memoryMap(ramSize: ram)
        try memory.store(UInt8(map.count), at: zp + 0x1E8)
        for (k, e) in map.enumerated() {
            let at = zp + 0x2D0 + UInt64(k) * 20
            try memory.store(e.base, at: at)
            try memory.store(e.length, at: at + 8)
            try memory.store(e.type, at: at + 16)
        }
        try Self.writeGDTAndPageTables(memory)
        return Self.entryState(entry: entry, bootParams: zp)
    }

    /// A GDT with __BOOT_CS (0x10, 64-bit code) and __BOOT_DS (0x18), and page tables
    /// identity-mapping the low 4 GiB with 2 MiB pages.
    static func writeGDTAndPageTables(_ memory: GuestMemory) throws {
        try memory.zero(at: gdtAddress, count: 32)
        try memory.store(UInt64(0x00AF_9B00_0000_FFFF), at: gdtAddress + 0x10)
        try memory.store(UInt64(0x00CF_9300_0000_FFFF), at: gdtAddress + 0x18)
        let pml4 = pageTablesAddress, pdpt = pml4 + 0x1000, directories = pml4 + 0x2000
        try memory.zero(at: pml4, count: 0x6000)
        try memory.store(pdpt | 0x3, at: pml4)
        for g in 0..<UInt64(4) {
            try memory.store((directories + g * 0x1000) | 0x3, at: pdpt + g * 8)
            for k in 0..<UInt64(512) {
                try memory.store(((g << 30) | (k << 21)) | 0x83, at: directories + g * 0x1000 + k * 8)  // present, writable, 2 MiB
            }
        }
    }

    /// Long mode: paging on with the identity map, 64-bit __BOOT_CS, flat data segments.
    static func entryState(entry: UInt64, bootParams: UInt64) -> VCPUState {
        var s = VCPUState()
        s.rip = entry
        s.rsi = bootParams
        s.rflags = 0x2
        s.cs = SegmentRegister(selector: 0x10, base: 0, limit: 0xFFFF_FFFF, type: 0xB, present: true, dpl: 0, db: false, s: true, l: true, g: true)
        let data = SegmentRegister(selector: 0x18, base: 0, limit: 0xFFFF_FFFF, type: 0x3, present: true, dpl: 0, db: true, s: true, l: false, g: true)
        s.ds = data; s.es = data; s.fs = data; s.gs = data; s.ss = data
        s.tr = SegmentRegister(selector: 0, base: 0, limit: 0xFFFF, type: 0xB, present: true)
        s.ldtr = SegmentRegister(selector: 0, base: 0, limit: 0xFFFF, type: 0x2, present: true)
        s.gdt = DescriptorTableRegister(base: gdtAddress, limit: 0x1F)
        s.idt = DescriptorTableRegister(base: 0, limit: 0)
        s.cr0 = 0x8000_0011  // PG | ET | PE
        s.cr3 = pageTablesAddress
        s.cr4 = 0x20  // PAE
        s.efer = 0x500  // LMA | LME
        return s
    }
}
