/// A decoded x86-64 instruction: everything the executor needs, so executing a cached
/// instruction touches no instruction bytes. Plain data (no references), 48 bytes.
struct Instr {
    /// Guest-physical address of the first byte (the decoded-instruction cache's tag).
    var tag: UInt64 = ~0
    /// Sign-extended displacement of the memory operand.
    var disp: UInt64 = 0
    /// The immediate: sign-extended for imm8/imm16-32 operands of arithmetic, zero-extended
    /// for imm16, MOV imm64 and moffs.
    var imm: UInt64 = 0
    /// Generation of the code page when decoded (see `CodePages`).
    var gen: UInt32 = 0
    /// Opcode: 0x000–0x0FF one-byte map, 0x100–0x1FF the 0F map.
    var op: UInt16 = 0
    /// ENTER's nesting level.
    var imm2: UInt16 = 0
    var length: UInt8 = 0
    var pfx: UInt8 = 0
    /// 0, 0xF2 or 0xF3.
    var rep: UInt8 = 0
    /// Segment override that matters in 64-bit mode: 0 none, 1 FS, 2 GS.
    var seg: UInt8 = 0
    /// ModRM.reg extended by REX.R (for opcodes with the register in the opcode: that
    /// register extended by REX.B).
    var reg: UInt8 = 0
    /// ModRM.rm extended by REX.B, for register operands.
    var rm: UInt8 = 0
    /// Memory operand: base and index register (16 = none, 17 = RIP for the base), scale shift.
    var base: UInt8 = 16
    var index: UInt8 = 16
    var scale: UInt8 = 0
    /// Operand size of the non-byte form (2, 4 or 8).
    var osize: UInt8 = 4
    var modrm: UInt8 = 0
    var _pad: UInt8 = 0

    enum P {
        static let opsize: UInt8 = 1, addr32: UInt8 = 2, lock: UInt8 = 4, rex: UInt8 = 8
        static let mem: UInt8 = 16, rexW: UInt8 = 32
    }

    @inline(__always) var hasREX: Bool { pfx & P.rex != 0 }
    @inline(__always) var isMem: Bool { pfx & P.mem != 0 }
    @inline(__always) var addr32: Bool { pfx & P.addr32 != 0 }
    @inline(__always) var opsize16: Bool { pfx & P.opsize != 0 }
    @inline(__always) var rexW: Bool { pfx & P.rexW != 0 }
    @inline(__always) var size: Int { Int(osize) }
    /// ModRM.reg without REX.R (the opcode extension of group opcodes).
    @inline(__always) var ext: Int { Int(modrm >> 3) & 7 }
}

/// Immediate kinds of the opcode maps.
private enum Imm {
    static let none = 0, b = 1, w = 2, z = 3, v = 4, moffs = 5, enter = 6, rel32 = 7
}

/// Up to 15 instruction bytes, possibly from two pages; a fault on the second page is
/// raised only when the decoder actually needs a byte from it.
struct FetchWindow {
    var bytes: (UInt64, UInt64) = (0, 0)
    var available = 0
    var secondPageFault: Fault? = nil

    @inline(__always)
    func byte(_ n: Int) throws(Fault) -> UInt8 {
        guard n < available else {
            if n >= 15 { throw Fault.gp() }
            throw secondPageFault ?? Fault.gp()
        }
        return withUnsafeBytes(of: bytes) { $0[n] }
    }
}

extension CPU {
    /// Fills `window` with the bytes at linear `rip` (whose first byte is at `gpa`).
    @inline(__always)
    func fillWindow(_ w: inout FetchWindow, rip: UInt64, gpa: UInt64) {
        let first = min(15, 0x1000 - Int(gpa & 0xFFF))
        let limit = ramSize - gpa  // gpa < ramSize checked by the caller
        let n = min(first, Int(min(limit, 16)))
        withUnsafeMutableBytes(of: &w.bytes) { dst in
            guard let d = dst.baseAddress else { return }
            d.copyMemory(from: ram + Int(gpa), byteCount: n)
        }
        w.available = n
        if n < first { w.secondPageFault = .fetchOutsideRAM(gpa: gpa &+ UInt64(n)); return }
        if n == first && first < 15 {
            // The instruction may continue on the next page.
            let next = (rip | 0xFFF) &+ 1
            do throws(Fault) {
                let g2 = try translate(next, write: false, execute: true, user: cpl == 3)
                guard g2 < ramSize else { w.secondPageFault = .fetchOutsideRAM(gpa: g2); return }
                let m = min(15 - first, Int(min(ramSize - g2, 16)))
                withUnsafeMutableBytes(of: &w.bytes) { dst in
                    guard let d = dst.baseAddress else { return }
                    (d + first).copyMemory(from: ram + Int(g2), byteCount: m)
                }
                w.available = first + m
            } catch {
                w.secondPageFault = error
            }
        }
    }

    /// Decodes the instruction in `w` into `e`. Throws #UD for encodings the engine does
    /// not implement (and #GP for instructions longer than 15 bytes).
    func decode(_ w: borrowing FetchWindow, into e: inout Instr) throws(Fault) {
        var n = 0
        var pfx: UInt8 = 0, rep: UInt8 = 0, seg: UInt8 = 0, rex: UInt8 = 0
        var b: Int
        prefixes: while true {
            b = Int(try w.byte(n)); n += 1
            switch b {
            case 0x66: pfx |= Instr.P.opsize
            case 0x67: pfx |= Instr.P.addr32
            case 0xF0: pfx |= Instr.P.lock
            case 0xF2, 0xF3: rep = UInt8(b)
            case 0x64: seg = 1
            case 0x65: seg = 2
            case 0x26, 0x2E, 0x36, 0x3E: break  // null segment prefixes in 64-bit mode
            case 0x40...0x4F: rex = UInt8(b); continue prefixes  // counts only right before the opcode
            default: break prefixes
            }
            rex = 0
        }
        if rex != 0 {
            pfx |= Instr.P.rex
            if rex & 8 != 0 { pfx |= Instr.P.rexW }
        }
        var op = b
        if b == 0x0F {
            op = 0x100 | Int(try w.byte(n)); n += 1
        }
        let osize: UInt8 = rex & 8 != 0 ? 8 : (pfx & Instr.P.opsize != 0 ? 2 : 4)
        var hasModRM = false
        var imm = Imm.none
        if op < 0x100 {
            switch op {
            case 0x00...0x3F:
                switch op & 7 {
                case 0...3: hasModRM = true
                case 4: imm = Imm.b
                case 5: imm = Imm.z
                default: throw Fault.ud
                }
            case 0x50...0x5F, 0x6C...0x6F, 0x90...0x99, 0x9B...0x9F, 0xA4...0xA7, 0xAA...0xAF,
                 0xC3, 0xC9, 0xCB, 0xCC, 0xCF, 0xD7, 0xEC...0xEF, 0xF1, 0xF4, 0xF5, 0xF8...0xFD:
                break
            case 0x63, 0x84...0x8F, 0xD0...0xD3, 0xD8...0xDF, 0xFE, 0xFF: hasModRM = true
            case 0x68: imm = Imm.z
            case 0x69: hasModRM = true; imm = Imm.z
            case 0x6A, 0x70...0x7F, 0xA8, 0xB0...0xB7, 0xCD, 0xE0...0xE7, 0xEB: imm = Imm.b
            case 0x6B, 0x80, 0x83, 0xC0, 0xC1, 0xC6: hasModRM = true; imm = Imm.b
            case 0x81, 0xC7: hasModRM = true; imm = Imm.z
            case 0xA0...0xA3: imm = Imm.moffs
            case 0xA9: imm = Imm.z
            case 0xB8...0xBF: imm = Imm.v
            case 0xC2, 0xCA: imm = Imm.w
            case 0xC8: imm = Imm.enter
            case 0xE8, 0xE9: imm = Imm.rel32
            case 0xF6, 0xF7: hasModRM = true  // immediate for /0 and /1 below
            default: throw Fault.ud
            }
        } else {
            switch op & 0xFF {
            case 0x05, 0x06, 0x07, 0x08, 0x09, 0x0B, 0x30, 0x31, 0x32, 0x77, 0xA0, 0xA1, 0xA2, 0xA8, 0xA9, 0xC8...0xCF:
                break
            case 0x00, 0x01, 0x0D, 0x18...0x1F, 0x20...0x23, 0x40...0x4F, 0x90...0x9F, 0xA3, 0xA5, 0xAB, 0xAD, 0xAE, 0xAF,
                 0xB0, 0xB1, 0xB3, 0xB6, 0xB7, 0xBB...0xBF, 0xC0, 0xC1, 0xC7:
                hasModRM = true
            case 0xB8:
                guard rep == 0xF3 else { throw Fault.ud }
                hasModRM = true
            case 0xA4, 0xAC, 0xBA: hasModRM = true; imm = Imm.b
            case 0x80...0x8F: imm = Imm.rel32
            case 0x70...0x73, 0xC2, 0xC4...0xC6: hasModRM = true; imm = Imm.b  // SSE with imm8
            case let sse where Self.isSSEOpcode(sse): hasModRM = true
            default: throw Fault.ud
            }
        }
        e.op = UInt16(op)
        e.pfx = pfx
        e.rep = rep
        e.seg = seg
        e.osize = osize
        e.base = 16
        e.index = 16
        e.scale = 0
        e.disp = 0
        e.modrm = 0
        e.rm = 0
        e.reg = UInt8(op & 7) | (rex & 1 != 0 ? 8 : 0)  // register-in-opcode forms
        if hasModRM {
            let m = try w.byte(n); n += 1
            e.modrm = m
            let mod = m >> 6, rmLow = m & 7
            e.reg = ((m >> 3) & 7) | (rex & 4 != 0 ? 8 : 0)
            // MOV to/from control registers always names a register, whatever mod says.
            if mod == 3 || (op >= 0x120 && op <= 0x123) {
                e.rm = rmLow | (rex & 1 != 0 ? 8 : 0)
            } else {
                e.pfx |= Instr.P.mem
                var disp: UInt64 = 0
                if rmLow == 4 {
                    let sib = try w.byte(n); n += 1
                    let index = ((sib >> 3) & 7) | (rex & 2 != 0 ? 8 : 0)
                    if index != 4 { e.index = index }
                    e.scale = sib >> 6
                    if sib & 7 == 5 && mod == 0 {
                        disp = try Self.le(w, &n, 4, signed: true)
                    } else {
                        e.base = (sib & 7) | (rex & 1 != 0 ? 8 : 0)
                    }
                } else if rmLow == 5 && mod == 0 {
                    e.base = 17
                    disp = try Self.le(w, &n, 4, signed: true)
                } else {
                    e.base = rmLow | (rex & 1 != 0 ? 8 : 0)
                }
                if mod == 1 { disp = try Self.le(w, &n, 1, signed: true) }
                if mod == 2 { disp = try Self.le(w, &n, 4, signed: true) }
                e.disp = disp
            }
            if (op == 0xF6 || op == 0xF7) && (m >> 3) & 7 < 2 { imm = op == 0xF6 ? Imm.b : Imm.z }
        }
        switch imm {
        case Imm.b: e.imm = try Self.le(w, &n, 1, signed: true)
        case Imm.w: e.imm = try Self.le(w, &n, 2, signed: false)
        case Imm.z: e.imm = try Self.le(w, &n, osize == 2 ? 2 : 4, signed: true)
        case Imm.v: e.imm = try Self.le(w, &n, Int(osize), signed: false)
        case Imm.moffs: e.imm = try Self.le(w, &n, pfx & Instr.P.addr32 != 0 ? 4 : 8, signed: false)
        case Imm.enter:
            e.imm = try Self.le(w, &n, 2, signed: false)
            e.imm2 = UInt16(try Self.le(w, &n, 1, signed: false))
        case Imm.rel32: e.imm = try Self.le(w, &n, 4, signed: true)
        default: e.imm = 0
        }
        if n > 15 { throw Fault.gp() }
        e.length = UInt8(n)
        if pfx & Instr.P.lock != 0 && !Self.lockable(e) { throw Fault.ud }
    }

    @inline(__always)
    private static func le(_ w: borrowing FetchWindow, _ n: inout Int, _ count: Int, signed: Bool) throws(Fault) -> UInt64 {
        var v: UInt64 = 0
        for i in 0..<count { v |= UInt64(try w.byte(n + i)) << (8 * UInt64(i)) }
        n += count
        if signed && count < 8 {
            let shift = UInt64(64 - 8 * count)
            v = UInt64(bitPattern: Int64(bitPattern: v << shift) >> Int64(shift))
        }
        return v
    }

    /// LOCK is allowed only on read-modify-write instructions with a memory destination.
    private static func lockable(_ e: Instr) -> Bool {
        guard e.isMem else { return false }
        let op = Int(e.op)
        switch op {
        case 0x00...0x3F: return op & 7 <= 1 && op >> 3 != 7
        case 0x80, 0x81, 0x83: return e.ext != 7
        case 0x86, 0x87: return true
        case 0xF6, 0xF7: return e.ext == 2 || e.ext == 3
        case 0xFE, 0xFF: return e.ext <= 1
        case 0x1AB, 0x1B3, 0x1BB, 0x1B0, 0x1B1, 0x1C0, 0x1C1: return true
        case 0x1BA: return e.ext >= 5
        case 0x1C7: return e.ext == 1
        default: return false
        }
    }
}
