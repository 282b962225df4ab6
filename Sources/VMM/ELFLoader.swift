import VirtCore

/// Why an ELF image cannot be loaded. Each case says what is wrong in terms a user of
/// `swiftvisor run path.elf` can act on.
public enum ELFLoadError: Error, Equatable, Sendable, CustomStringConvertible {
    case tooSmall(size: Int)
    case badMagic
    case notELF64(classByte: UInt8)
    case notLittleEndian
    case wrongMachine(UInt16)
    case notExecutable(type: UInt16)
    case badProgramHeaderTable
    case segmentOutsideFile(index: Int)
    case segmentFileSizeExceedsMemorySize(index: Int)
    case segmentOutsideRAM(index: Int, start: UInt64, end: UInt64, ramSize: UInt64)
    case segmentOverlapsReserved(index: Int, start: UInt64, reservedEnd: UInt64)
    case noLoadableSegments
    case entryNotLoaded(entry: UInt64)

    public var description: String {
        func hex(_ v: UInt64) -> String { "0x" + String(v, radix: 16) }
        switch self {
        case let .tooSmall(size): return "not an ELF file: only \(size) bytes"
        case .badMagic: return "not an ELF file (bad magic number)"
        case let .notELF64(c): return "ELF class \(c) is not ELF64 (class 2)"
        case .notLittleEndian: return "ELF file is not little-endian"
        case let .wrongMachine(m): return "ELF machine \(m) is not x86-64 (62)"
        case let .notExecutable(t): return "ELF type \(t) is not a static executable (ET_EXEC, 2)"
        case .badProgramHeaderTable: return "ELF program header table is malformed or outside the file"
        case let .segmentOutsideFile(i): return "ELF segment \(i) refers to bytes past the end of the file"
        case let .segmentFileSizeExceedsMemorySize(i): return "ELF segment \(i) has file size larger than memory size"
        case let .segmentOutsideRAM(i, s, e, ram):
            return "ELF segment \(i) [\(hex(s)), \(hex(e))) does not fit in guest RAM of \(hex(ram)) bytes (try a larger --memory)"
        case let .segmentOverlapsReserved(i, s, r):
            return "ELF segment \(i) at \(hex(s)) overlaps the VMM's page tables and boot info below \(hex(r)); link guests at 1 MiB"
        case .noLoadableSegments: return "ELF file has no loadable (PT_LOAD) segments"
        case let .entryNotLoaded(e): return "ELF entry point \(hex(e)) is not inside any loaded segment"
        }
    }
}

/// A validated static ELF64 x86-64 executable.
public struct ELFImage: Sendable {
    public struct Segment: Sendable, Equatable {
        public var physicalAddress: UInt64
        public var fileOffset: Int
        public var fileSize: Int
        public var memorySize: UInt64
        public var flags: UInt32
    }

    public let entry: UInt64
    public let segments: [Segment]
    private let bytes: [UInt8]

    static let ptLoad: UInt32 = 1

    /// Parses and checks the headers. Placement against a RAM size is checked by `load`.
    public init(bytes: [UInt8]) throws(ELFLoadError) {
        guard bytes.count >= 64 else { throw .tooSmall(size: bytes.count) }
        guard bytes[0] == 0x7F, bytes[1] == 0x45, bytes[2] == 0x4C, bytes[3] == 0x46 else { throw .badMagic }
        guard bytes[4] == 2 else { throw .notELF64(classByte: bytes[4]) }
        guard bytes[5] == 1 else { throw .notLittleEndian }
        func u16(_ o: Int) -> UInt16 { UInt16(bytes[o]) | UInt16(bytes[o + 1]) << 8 }
        func u32(_ o: Int) -> UInt32 { (0..<4).reduce(0) { $0 | UInt32(bytes[o + $1]) << (8 * UInt32($1)) } }
        func u64(_ o: Int) -> UInt64 { (0..<8).reduce(0) { $0 | UInt64(bytes[o + $1]) << (8 * UInt64($1)) } }
        let type = u16(16)
        guard type == 2 else { throw .notExecutable(type: type) }
        let machine = u16(18)
        guard machine == 62 else { throw .wrongMachine(machine) }
        let entry = u64(24)
        let phoff = u64(32)
        let phentsize = Int(u16(54))
        let phnum = Int(u16(56))
        guard phentsize >= 56, phoff <= UInt64(bytes.count),
              UInt64(phnum) * UInt64(phentsize) <= UInt64(bytes.count) - phoff else { throw .badProgramHeaderTable }

        var segments: [Segment] = []
        for i in 0..<phnum {
            let h = Int(phoff) + i * phentsize
            guard u32(h) == Self.ptLoad else { continue }
            let offset = u64(h + 8), paddr = u64(h + 24), filesz = u64(h + 32), memsz = u64(h + 40)
            guard offset <= UInt64(bytes.count), filesz <= UInt64(bytes.count) - offset else { throw .segmentOutsideFile(index: i) }
            guard filesz <= memsz else { throw .segmentFileSizeExceedsMemorySize(index: i) }
            if memsz == 0 { continue }
            segments.append(Segment(physicalAddress: paddr, fileOffset: Int(offset), fileSize: Int(filesz),
                                    memorySize: memsz, flags: u32(h + 4)))
        }
        guard !segments.isEmpty else { throw .noLoadableSegments }
        guard segments.contains(where: { entry >= $0.physicalAddress && entry - $0.physicalAddress < $0.memorySize }) else {
            throw .entryNotLoaded(entry: entry)
        }
        self.entry = entry
        self.segments = segments
        self.bytes = bytes
    }

    /// Checks every segment lies in `[imageBase, ramSize)`, then copies it in (zeroing
    /// the part past the file bytes). Nothing is written unless every check passes.
    public func load(into memory: GuestMemory) throws {
        for (i, s) in segments.enumerated() {
            let (end, overflow) = s.physicalAddress.addingReportingOverflow(s.memorySize)
            guard s.physicalAddress >= BootLayout.imageBase else {
                throw ELFLoadError.segmentOverlapsReserved(index: i, start: s.physicalAddress, reservedEnd: BootLayout.imageBase)
            }
            guard !overflow, end <= memory.size else {
                throw ELFLoadError.segmentOutsideRAM(index: i, start: s.physicalAddress, end: overflow ? .max : end, ramSize: memory.size)
            }
        }
        for s in segments {
            try memory.write(bytes[s.fileOffset..<(s.fileOffset + s.fileSize)], at: s.physicalAddress)
            let bss = s.memorySize - UInt64(s.fileSize)
            if bss > 0 { try memory.zero(at: s.physicalAddress + UInt64(s.fileSize), count: Int(bss)) }
        }
    }
}
