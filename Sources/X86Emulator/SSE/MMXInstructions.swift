import CHost

/// MMX: the 0F-map integer instructions without a mandatory prefix, on MM0–MM7. MMi is
/// the 64-bit mantissa of x87 physical register Ri (SDM Vol. 1 §9.5): an MMX instruction
/// sets TOP to 0 and tags every register valid, a write also sets the register's exponent
/// and sign bits (79:64) to ones, and EMMS tags them all empty — so FXSAVE shows MMi in
/// the slot of ST(i). The operations run on the host as their 128-bit SSE2 forms (low 64
/// bits in, low 64 bits out; unpack-high and pack reshape their operands to fit).
/// Interpreted only: a translated block ends before any of them.
extension CPU {
    /// The 0F opcodes with an MMX form (ModRM; 70–73, C4, C5 with an imm8). EMMS (77) is apart.
    static func isMMXOpcode(_ op: Int) -> Bool {
        switch op {
        case 0x60...0x6B, 0x6E...0x76, 0x7E, 0x7F, 0xC4, 0xC5, 0xD1...0xD5, 0xD7...0xE5, 0xE7...0xEF, 0xF1...0xFE: return true
        default: return false
        }
    }

    /// #UD with CR0.EM, #NM with CR0.TS, #MF with an unmasked x87 exception pending (CR0.NE).
    private func requireMMX() throws(Fault) {
        if cr0 & CR.em != 0 { throw Fault.ud }
        if cr0 & CR.ts != 0 { throw Fault.nm }
        if fp.fsw & 0x80 != 0 && cr0 & CR.ne != 0 { throw Fault.mf }
    }

    @inline(__always) private func mmxSlot(_ n: Int) -> UnsafeMutableRawPointer {
        fp.buffer + FloatingPointState.x87Registers + 16 * (n & 7)
    }

    @inline(__always) func mmx(_ n: Int) -> UInt64 { mmxSlot(n).load(as: UInt64.self) }

    @inline(__always) func setMMX(_ n: Int, _ value: UInt64) {
        mmxSlot(n).storeBytes(of: value, as: UInt64.self)
        mmxSlot(n).storeBytes(of: UInt16.max, toByteOffset: 8, as: UInt16.self)
    }

    /// EMMS: every x87 register empty.
    func emms() throws(Fault) {
        try requireMMX()
        fp.inUse |= 1
        fp.valid = 0
    }

    func executeMMX(_ i: Instr) throws(Fault) {
        try requireMMX()
        fp.inUse |= 1
        fp.fsw &= ~0x3800  // TOP = 0
        fp.valid = 0xFF
        let op = Int(i.op) & 0xFF
        let r = Int(i.reg) & 7, m = Int(i.rm) & 7
        /// The source operand: MM(rm) or 64 bits of memory.
        func source() throws(Fault) -> UInt64 { i.isMem ? try read(ea(i), size: 8) : mmx(m) }
        switch op {
        case 0x6E:  // MOVD/MOVQ mm, r/m32/64 (zero-extended)
            setMMX(r, try readRM(i, i.rexW ? 8 : 4))
        case 0x7E:  // MOVD/MOVQ r/m32/64, mm
            let size = i.rexW ? 8 : 4
            try writeRM(i, size, mmx(r) & Self.mask(size))
        case 0x6F:  // MOVQ mm, mm/m64
            setMMX(r, try source())
        case 0x7F:  // MOVQ mm/m64, mm
            if i.isMem { try write(ea(i), mmx(r), size: 8) } else { setMMX(m, mmx(r)) }
        case 0xE7:  // MOVNTQ m64, mm
            guard i.isMem else { throw Fault.ud }
            try write(ea(i), mmx(r), size: 8)
        case 0xF7:  // MASKMOVQ mm, mm: byte-masked store to [RDI]
            guard !i.isMem else { throw Fault.ud }
            var base = gpr[7]
            if i.addr32 { base &= 0xFFFF_FFFF }
            if i.seg != 0 { base &+= i.seg == 1 ? fs.base : gs.base }
            let data = mmx(r), mask = mmx(m)
            for k in 0..<8 where (mask >> UInt64(8 * k + 7)) & 1 != 0 {
                try write(base &+ UInt64(k), (data >> UInt64(8 * k)) & 0xFF, size: 1)
            }
        case 0x68...0x6A:  // PUNPCKHBW/WD/DQ: PUNPCKL* of the high halves
            setMMX(r, try onHost(0x100 | (op - 8), mmx(r) >> 32, try source() >> 32))
        case 0x63, 0x67, 0x6B:  // PACKSSWB, PACKUSWB, PACKSSDW: the 128-bit pack of mm:source
            setMMX(r, try onHost(0x100 | op, mmx(r), 0, high: try source()))
        case 0x70:  // PSHUFW: PSHUFLW's low half
            setMMX(r, try onHost(0x370, 0, try source(), immediate: UInt32(i.imm & 0xFF)))
        case 0x71, 0x72, 0x73:  // shifts by an immediate: /2 /4 /6 (no byte shifts of the whole register)
            guard !i.isMem, i.ext == 2 || i.ext == 6 || (i.ext == 4 && op != 0x73) else { throw Fault.ud }
            setMMX(m, try onHost(0x100 | op, mmx(m), 0, immediate: UInt32(i.imm & 0xFF) | UInt32(i.ext) << 8))
        case 0xC4:  // PINSRW mm, r32/m16, imm8
            let v = i.isMem ? try read(ea(i), size: 2) : gpr[Int(i.rm)] & 0xFFFF
            setMMX(r, try onHost(0x1C4, mmx(r), v, immediate: UInt32(i.imm & 3)))
        case 0xC5:  // PEXTRW r32, mm, imm8
            guard !i.isMem else { throw Fault.ud }
            gpr[Int(i.reg)] = (mmx(m) >> UInt64(16 * (i.imm & 3))) & 0xFFFF
        case 0xD7:  // PMOVMSKB r32, mm
            guard !i.isMem else { throw Fault.ud }
            var bits: UInt64 = 0
            let v = mmx(m)
            for k in 0..<8 { bits |= ((v >> UInt64(8 * k + 7)) & 1) << UInt64(k) }
            gpr[Int(i.reg)] = bits
        default:  // the element-wise operations: the same as the low half of their SSE2 form
            setMMX(r, try onHost(0x100 | op, mmx(r), try source()))
        }
    }

    /// Runs SSE2 operation `code` on the host with destination (`destination`, `high`) and
    /// source (`source`, 0); the low 64 bits of the result.
    private func onHost(_ code: Int, _ destination: UInt64, _ source: UInt64, high: UInt64 = 0, immediate: UInt32 = 0) throws(Fault) -> UInt64 {
        let b = fp.buffer
        let dst = b + FloatingPointState.scratchDestination, src = b + FloatingPointState.scratchSource
        dst.storeBytes(of: destination, as: UInt64.self)
        dst.storeBytes(of: high, toByteOffset: 8, as: UInt64.self)
        src.storeBytes(of: source, as: UInt64.self)
        src.storeBytes(of: 0, toByteOffset: 8, as: UInt64.self)
        var raised: UInt32 = 0
        var result: UInt64 = 0
        guard host_sse_execute(UInt32(code), immediate, dst, src, fp.mxcsr, &raised, &result) == 0 else { throw Fault.ud }
        return dst.load(as: UInt64.self)
    }
}
