import CHost
import VirtCore

/// SSE and SSE2 (the 0F-map instructions with XMM operands). Moves and memory operands are
/// handled here; arithmetic is done by the host CPU's own instruction under the guest's
/// MXCSR (`host_sse_execute`), so results and exception flags are the hardware's.
extension CPU {
    /// The 0F opcodes that are SSE/SSE2 instructions (the decoder gives them a ModRM).
    static func isSSEOpcode(_ op: Int) -> Bool {
        switch op {
        case 0x10...0x17, 0x28...0x2F, 0x50...0x76, 0x7E, 0x7F, 0xC2...0xC6, 0xD1...0xFE: return true
        default: return false
        }
    }

    /// #UD without OSFXSR or with CR0.EM; #NM with CR0.TS.
    @inline(__always)
    func requireSSE() throws(Fault) {
        if cr0 & CR.em != 0 || cr4 & CR.osfxsr == 0 { throw Fault.ud }
        if cr0 & CR.ts != 0 { throw Fault.nm }
    }

    /// Reads `size` bytes (4, 8 or 16) of a vector memory operand; 16-byte operands must be
    /// aligned unless `unaligned`.
    @inline(__always)
    func readVector(_ a: UInt64, size: Int, unaligned: Bool = false) throws(Fault) -> (UInt64, UInt64) {
        if size == 16 {
            if !unaligned && a & 15 != 0 { throw Fault.gp() }
            let lo = try read(a, size: 8)
            return (lo, try read(a &+ 8, size: 8))
        }
        return (try read(a, size: size), 0)
    }

    /// Writes 16 bytes after checking both ends, so a fault leaves memory untouched.
    @inline(__always)
    func writeVector(_ a: UInt64, _ lo: UInt64, _ hi: UInt64, aligned: Bool) throws(Fault) {
        if aligned && a & 15 != 0 { throw Fault.gp() }
        let user = cs.dpl == 3
        _ = try translate(a, write: true, user: user)
        _ = try translate(a &+ 15, write: true, user: user)
        try write(a, lo, size: 8)
        try write(a &+ 8, hi, size: 8)
    }

    /// The mandatory-prefix index: 0 none, 1 66, 2 F3, 3 F2 (F2/F3 win over 66).
    @inline(__always)
    static func ssePrefix(_ i: Instr) -> Int { i.rep == 0xF3 ? 2 : i.rep == 0xF2 ? 3 : (i.opsize16 ? 1 : 0) }

    func executeSSE(_ i: Instr) throws(Fault) {
        let op = Int(i.op) & 0xFF
        let code = Self.ssePrefix(i) << 8 | op
        if op == 0xC3 {  // MOVNTI m32/64, r: an integer store, not subject to CR0/CR4 checks
            guard code == 0xC3, i.isMem else { throw Fault.ud }
            try write(ea(i), reg(Int(i.reg), i.rexW ? 8 : 4, i.hasREX), size: i.rexW ? 8 : 4)
            return
        }
        if code == op && Self.isMMXOpcode(op) { try executeMMX(i); return }
        try requireSSE()
        fp.inUse |= 2
        let r = Int(i.reg), m = Int(i.rm)
        switch code {
        case 0x010, 0x110, 0x028, 0x128, 0x16F, 0x26F:  // MOVUPS MOVUPD MOVAPS MOVAPD MOVDQA MOVDQU loads
            if i.isMem {
                let (lo, hi) = try readVector(ea(i), size: 16, unaligned: code == 0x010 || code == 0x110 || code == 0x26F)
                fp.set(r, low: lo, high: hi)
            } else {
                fp.set(r, low: fp.low(m), high: fp.high(m))
            }
        case 0x011, 0x111, 0x029, 0x129, 0x17F, 0x27F:  // the same, stores
            if i.isMem {
                try writeVector(ea(i), fp.low(r), fp.high(r), aligned: !(code == 0x011 || code == 0x111 || code == 0x27F))
            } else {
                fp.set(m, low: fp.low(r), high: fp.high(r))
            }
        case 0x02B, 0x12B, 0x1E7:  // MOVNTPS MOVNTPD MOVNTDQ
            guard i.isMem else { throw Fault.ud }
            try writeVector(ea(i), fp.low(r), fp.high(r), aligned: true)
        case 0x210, 0x310:  // MOVSS/MOVSD load (memory: zero the rest)
            guard i.isMem else { try compute(i, code, source: (fp.low(m), fp.high(m))); return }
            let v = try read(ea(i), size: code == 0x210 ? 4 : 8)
            fp.set(r, low: v, high: 0)
        case 0x211, 0x311:  // MOVSS/MOVSD store (register: merge into the low element)
            let size = code == 0x211 ? 4 : 8
            if i.isMem {
                try write(ea(i), fp.low(r) & Self.mask(size), size: size)
            } else {
                let keep: UInt64 = size == 4 ? 0xFFFF_FFFF_0000_0000 : 0
                fp.set(m, low: (fp.low(m) & keep) | (fp.low(r) & ~keep), high: fp.high(m))
            }
        case 0x012, 0x112, 0x016, 0x116:  // MOVLPS/MOVLPD/MOVHPS/MOVHPD m64 (register forms: MOVHLPS, MOVLHPS)
            guard i.isMem else {
                guard code & 0xF00 == 0 else { throw Fault.ud }
                try compute(i, code, source: (fp.low(m), fp.high(m)))
                return
            }
            let v = try read(ea(i), size: 8)
            if op == 0x12 { fp.set(r, low: v, high: fp.high(r)) } else { fp.set(r, low: fp.low(r), high: v) }
        case 0x013, 0x113, 0x017, 0x117:  // MOVLPS/MOVLPD/MOVHPS/MOVHPD stores
            guard i.isMem else { throw Fault.ud }
            try write(ea(i), op == 0x13 ? fp.low(r) : fp.high(r), size: 8)
        case 0x16E:  // MOVD/MOVQ xmm, r/m32/64
            let size = i.rexW ? 8 : 4
            fp.set(r, low: try readRM(i, size), high: 0)
        case 0x17E:  // MOVD/MOVQ r/m32/64, xmm
            let size = i.rexW ? 8 : 4
            try writeRM(i, size, fp.low(r) & Self.mask(size))
        case 0x27E:  // MOVQ xmm, xmm/m64 (zeroes the high half)
            fp.set(r, low: i.isMem ? try read(ea(i), size: 8) : fp.low(m), high: 0)
        case 0x1D6:  // MOVQ xmm/m64, xmm
            if i.isMem { try write(ea(i), fp.low(r), size: 8) } else { fp.set(m, low: fp.low(r), high: 0) }
        case 0x1F7:  // MASKMOVDQU: byte-masked store to [RDI]
            guard !i.isMem else { throw Fault.ud }
            var base = gpr[7]
            if i.addr32 { base &= 0xFFFF_FFFF }
            if i.seg != 0 { base &+= i.seg == 1 ? fs.base : gs.base }
            for k in 0..<16 {
                let maskByte = (k < 8 ? fp.low(m) >> UInt64(8 * k) : fp.high(m) >> UInt64(8 * (k - 8))) & 0xFF
                guard maskByte & 0x80 != 0 else { continue }
                let byte = (k < 8 ? fp.low(r) >> UInt64(8 * k) : fp.high(r) >> UInt64(8 * (k - 8))) & 0xFF
                try write(base &+ UInt64(k), byte, size: 1)
            }
        case 0x050, 0x150, 0x1D7, 0x1C5:  // MOVMSKPS MOVMSKPD PMOVMSKB PEXTRW: register operands only
            guard !i.isMem else { throw Fault.ud }
            let v = try compute(i, code, source: (fp.low(m), fp.high(m)), writeBack: false)
            gpr[r] = v
        case 0x1C4:  // PINSRW xmm, r32/m16, imm8
            let v = i.isMem ? try read(ea(i), size: 2) : gpr[m] & 0xFFFF
            try compute(i, code, source: (v, 0))
        case 0x22A, 0x32A:  // CVTSI2SS/CVTSI2SD xmm, r/m32/64
            let size = i.rexW ? 8 : 4
            try compute(i, code | (i.rexW ? 0x400 : 0), source: (try readRM(i, size), 0))
        case 0x22C, 0x22D, 0x32C, 0x32D:  // CVT(T)SS2SI / CVT(T)SD2SI r32/64, xmm/m
            let src = i.isMem ? (try read(ea(i), size: code >> 8 == 2 ? 4 : 8), UInt64(0))
                              : (fp.low(m), fp.high(m))
            let v = try compute(i, code | (i.rexW ? 0x400 : 0), source: src, writeBack: false)
            gpr[r] = i.rexW ? v : v & 0xFFFF_FFFF
        case 0x02E, 0x02F, 0x12E, 0x12F:  // (U)COMISS, (U)COMISD
            let src = i.isMem ? (try read(ea(i), size: code >> 8 == 0 ? 4 : 8), UInt64(0)) : (fp.low(m), fp.high(m))
            let flags = try compute(i, code, source: src, writeBack: false)
            rflags = (rflags & ~Flag.arithmetic) | flags
        case 0x171, 0x172, 0x173:  // shifts by an immediate (register operand only)
            guard !i.isMem else { throw Fault.ud }
            try compute(i, code, source: (0, 0), destination: m, immediate: UInt32(i.imm & 0xFF) | UInt32(i.ext) << 8)
        default:
            guard !i.isMem else {
                let size = Self.sseMemorySize(code)
                try compute(i, code, source: try readVector(ea(i), size: size))
                return
            }
            try compute(i, code, source: (fp.low(m), fp.high(m)))
        }
    }

    /// Bytes a computational instruction reads from memory: scalars 4 or 8, a few
    /// conversions 8, everything else 16 (aligned).
    static func sseMemorySize(_ code: Int) -> Int {
        let op = code & 0xFF
        switch code >> 8 {
        case 0: return op == 0x5A ? 8 : 16  // CVTPS2PD m64
        case 2: return op == 0x5B ? 16 : op == 0xE6 ? 8 : 4  // CVTTPS2DQ m128, CVTDQ2PD m64
        case 3: return op == 0xE6 ? 16 : 8  // CVTPD2DQ m128
        default: return 16
        }
    }

    /// Runs `code` on the host with XMM[`destination`] (default: ModRM.reg) and `source`;
    /// writes the result back unless asked not to, and returns the general-purpose result.
    /// Unmasked SIMD exceptions raise #XM (#UD without CR4.OSXMMEXCPT) with the
    /// destination unchanged and the flags set.
    @discardableResult
    func compute(_ i: Instr, _ code: Int, source: (UInt64, UInt64), destination: Int = -1, immediate: UInt32? = nil,
                 writeBack: Bool = true) throws(Fault) -> UInt64 {
        let d = destination >= 0 ? destination : Int(i.reg)
        let b = fp.buffer
        let dst = b + FloatingPointState.scratchDestination, src = b + FloatingPointState.scratchSource
        dst.copyMemory(from: fp.xmm(d), byteCount: 16)
        src.storeBytes(of: source.0, as: UInt64.self)
        src.storeBytes(of: source.1, toByteOffset: 8, as: UInt64.self)
        var raised: UInt32 = 0
        var result: UInt64 = 0
        let status = host_sse_execute(UInt32(code), immediate ?? UInt32(truncatingIfNeeded: i.imm & 0xFF), dst, src, fp.mxcsr, &raised, &result)
        guard status == 0 else { throw Fault.ud }
        if raised != 0 {
            fp.mxcsr |= raised
            if raised & ~(fp.mxcsr >> 7) & 0x3F != 0 { throw cr4 & CR.osxmmexcpt != 0 ? Fault.xm : Fault.ud }
        }
        if writeBack { fp.xmm(d).copyMemory(from: dst, byteCount: 16) }
        return result
    }
}
