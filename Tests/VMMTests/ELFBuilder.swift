/// Builds small ELF64 images in memory for loader and engine tests.
struct ELFBuilder {
    struct Segment { var paddr: UInt64; var bytes: [UInt8]; var memsz: UInt64?; var offsetOverride: UInt64? = nil; var fileszOverride: UInt64? = nil }

    var entry: UInt64 = 0x10_0000
    var segments: [Segment] = []
    var classByte: UInt8 = 2
    var dataByte: UInt8 = 1
    var type: UInt16 = 2
    var machine: UInt16 = 62
    var magic: [UInt8] = [0x7F, 0x45, 0x4C, 0x46]
    var phoffOverride: UInt64?
    var phnumOverride: UInt16?

    init(code: [UInt8] = [0xF4], at paddr: UInt64 = 0x10_0000) {
        entry = paddr
        segments = [Segment(paddr: paddr, bytes: code, memsz: nil)]
    }

    func build() -> [UInt8] {
        var out = [UInt8](repeating: 0, count: 64)
        func put<T: FixedWidthInteger>(_ v: T, _ at: Int, in buf: inout [UInt8]) {
            for i in 0..<MemoryLayout<T>.size { buf[at + i] = UInt8(truncatingIfNeeded: v >> (8 * i)) }
        }
        out.replaceSubrange(0..<4, with: magic)
        out[4] = classByte; out[5] = dataByte; out[6] = 1
        put(type, 16, in: &out); put(machine, 18, in: &out); put(UInt32(1), 20, in: &out)
        put(entry, 24, in: &out)
        put(phoffOverride ?? 64, 32, in: &out)
        put(UInt16(64), 52, in: &out); put(UInt16(56), 54, in: &out)
        put(phnumOverride ?? UInt16(segments.count), 56, in: &out)
        var data: [UInt8] = []
        var headers: [UInt8] = []
        let dataStart = 64 + 56 * segments.count
        for s in segments {
            var h = [UInt8](repeating: 0, count: 56)
            put(UInt32(1), 0, in: &h); put(UInt32(7), 4, in: &h)
            put(s.offsetOverride ?? UInt64(dataStart + data.count), 8, in: &h)
            put(s.paddr, 16, in: &h); put(s.paddr, 24, in: &h)
            put(s.fileszOverride ?? UInt64(s.bytes.count), 32, in: &h)
            put(s.memsz ?? UInt64(s.bytes.count), 40, in: &h)
            headers += h
            data += s.bytes
        }
        return out + headers + data
    }
}
