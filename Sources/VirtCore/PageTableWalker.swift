/// Reads a guest's own 4-level page tables (guest-virtual → guest-physical) from host
/// side, for diagnostics such as showing the instruction bytes at a faulting RIP.
/// Checks presence only, not permissions.
public enum PageTableWalker {
    public static func translate(_ gva: UInt64, cr3: UInt64, memory: GuestMemory) -> UInt64? {
        var table = cr3 & 0x000F_FFFF_FFFF_F000
        for level in stride(from: 3, through: 0, by: -1) {
            let index = (gva >> (12 + 9 * UInt64(level))) & 0x1FF
            guard let entry = try? memory.load(UInt64.self, at: table + index * 8), entry & 1 != 0 else { return nil }
            let frame = entry & 0x000F_FFFF_FFFF_F000
            if level == 0 { return frame | (gva & 0xFFF) }
            if level <= 2, entry & 0x80 != 0 {  // 1 GiB or 2 MiB page
                let pageMask: UInt64 = (1 << (12 + 9 * UInt64(level))) - 1
                return (frame & ~pageMask) | (gva & pageMask)
            }
            table = frame
        }
        return nil
    }

    /// Up to `count` bytes at guest-virtual `gva`, stopping at the first untranslatable byte.
    public static func readVirtual(_ gva: UInt64, count: Int, cr3: UInt64, memory: GuestMemory) -> [UInt8] {
        var bytes: [UInt8] = []
        for i in 0..<UInt64(count) {
            guard let gpa = translate(gva &+ i, cr3: cr3, memory: memory),
                  let b = try? memory.load(UInt8.self, at: gpa) else { break }
            bytes.append(b)
        }
        return bytes
    }
}
