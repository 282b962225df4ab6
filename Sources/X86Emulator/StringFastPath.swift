extension CPU {
    /// REP MOVS / REP STOS going forwards (DF = 0) over RAM: as many elements as fit on the
    /// current source and destination pages (and in `budget`) in one host copy or fill,
    /// after one translation per page, instead of two translations per element. Returns the
    /// elements done, with RCX/RSI/RDI moved on; 0 leaves everything to the element loop
    /// (an element crossing a page, MMIO, a locked access, an overlap where the element
    /// order shows). A translation fault is the first element's, as in the element loop.
    @inline(__always)
    func bulkString(_ op: Int, _ size: Int, _ m: UInt64, _ segBase: UInt64, _ rex: Bool, budget: UInt64) throws(Fault) -> UInt64 {
        if lockedAccess.active || holdsMMIOReads { return 0 }
        let s = UInt64(size)
        let di = gpr[7] & m
        var n = min(gpr[1] & m, budget, (0x1000 - (di & 0xFFF)) / s)
        let user = cs.dpl == 3
        if op >= 0xAA {  // STOS
            guard n > 1 else { return 0 }
            let d = try translate(di, write: true, user: user)
            let bytes = n &* s
            guard d < ramSize && bytes <= ramSize - d else { return 0 }
            CodePages.noteWrite(codeGens, Int(d >> 12))
            let p = ram + Int(d)
            let v = reg(0, size, rex)
            switch size {
            case 1: p.initializeMemory(as: UInt8.self, repeating: UInt8(truncatingIfNeeded: v), count: Int(n))
            case 2: for k in 0..<Int(n) { p.storeBytes(of: UInt16(truncatingIfNeeded: v), toByteOffset: 2 * k, as: UInt16.self) }
            case 4: for k in 0..<Int(n) { p.storeBytes(of: UInt32(truncatingIfNeeded: v), toByteOffset: 4 * k, as: UInt32.self) }
            default: for k in 0..<Int(n) { p.storeBytes(of: v, toByteOffset: 8 * k, as: UInt64.self) }
            }
            gpr[7] = (di &+ bytes) & m
        } else {  // MOVS
            let si = gpr[6] & m
            let source = si &+ segBase
            n = min(n, (0x1000 - (si & 0xFFF)) / s, (0x1000 - (source & 0xFFF)) / s)
            guard n > 1 else { return 0 }
            let from = try translate(source, write: false, user: user)
            let d = try translate(di, write: true, user: user)
            let bytes = n &* s
            guard from < ramSize && bytes <= ramSize - from && d < ramSize && bytes <= ramSize - d else { return 0 }
            // Forward element order equals memmove unless the destination starts inside the source.
            if d > from && d < from &+ bytes { return 0 }
            CodePages.noteWrite(codeGens, Int(d >> 12))
            (ram + Int(d)).copyMemory(from: ram + Int(from), byteCount: Int(bytes))
            gpr[6] = (si &+ bytes) & m
            gpr[7] = (di &+ bytes) & m
        }
        gpr[1] = ((gpr[1] & m) &- n) & m
        return n
    }
}
