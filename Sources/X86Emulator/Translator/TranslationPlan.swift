/// What the block translator does with one decoded guest instruction. Guest and host are
/// both x86-64, so most integer instructions run as themselves: the same opcode with its
/// register operands renamed to the host registers caching the guest's, and its memory
/// operand replaced by `[rsi]` (the host address the inline TLB lookup produced). Guest
/// RFLAGS live in host RFLAGS inside a block; nothing the translator adds between
/// instructions touches them. Anything not planned here ends the block and is interpreted.
struct TranslationPlan {
    enum Kind {
        /// Re-encoded as itself. `regField` is a guest register, or a group opcode's /ext.
        case native
        case lea
        case movImmediate
        case bswap
        case nop
        /// MUL/IMUL/DIV/IDIV with RDX:RAX (DIV and IDIV guarded against #DE).
        case multiplyDivide
        /// CBW/CWDE/CDQE (0x98) and CWD/CDQ/CQO (0x99).
        case extendAccumulator
        case signExtendIntoDX
        case push
        case pushImmediate
        case pop
        // Block ends.
        case jcc(cc: UInt8, target: UInt64)
        case jmp(target: UInt64)
        case call(target: UInt64)
        case ret
        case jmpIndirect
        case callIndirect
    }

    enum Field { case guest(Int), ext(Int) }

    var kind: Kind
    var opcode = HostOpcode.none
    var regField: Field = .ext(0)
    /// The r/m operand when it is a register (nil: memory, or none).
    var rmGuest: Int? = nil
    var immediateSize = 0
    var byteRegisters = false
    var prefixF3 = false
    var usesCL = false
    /// Memory operand access: bytes, and whether it writes (writes use the write tag; a
    /// read-modify-write needs write permission anyway).
    var memorySize = 0
    var memoryWrite = false
    /// Guest registers read or written (bit per register), and written.
    var used: UInt16 = 0
    var written: UInt16 = 0
    /// Uses the arithmetic flags as an input (Jcc, SETcc, CMOVcc, ADC, SBB, RCL, RCR).
    var readsFlags = false
    /// May raise an exception the translated code checks for (DIV/IDIV: #DE).
    var mayFault = false
    /// Changes arithmetic flags; `partialFlags`: only some of them, or none for some
    /// operands (INC/DEC keep CF, shifts by 0 keep all), so the old values pass through.
    var writesFlags = false
    var partialFlags = false

    /// The instruction may hand itself to the interpreter (a memory access missing the
    /// inline TLB, a non-canonical branch target).
    var mayLeaveEarly: Bool {
        switch kind {
        case .push, .pushImmediate, .pop, .call, .ret, .jmpIndirect, .callIndirect: return true
        default: return memorySize != 0 || mayFault
        }
    }

    var endsBlock: Bool {
        switch kind {
        case .jcc, .jmp, .call, .ret, .jmpIndirect, .callIndirect: return true
        default: return false
        }
    }
}

extension TranslationPlan {
    /// The plan for `i` at `rip`, or nil when the interpreter must run it.
    static func make(_ i: Instr, rip: UInt64, sharedMemory: Bool = false) -> TranslationPlan? {
        let op = Int(i.op)
        if i.pfx & Instr.P.lock != 0 { return nil }
        let next = rip &+ UInt64(i.length)
        let isMem = i.isMem
        let w = i.osize
        let zSize = w == 2 ? 2 : 4

        // REP/REPNE mean something only for these; elsewhere refuse rather than guess.
        if i.rep != 0 && !(op == 0xC3 || ((op == 0x1B8 || op == 0x1BC || op == 0x1BD) && i.rep == 0xF3)) { return nil }

        var p = TranslationPlan(kind: .native)
        func native(_ opcode: HostOpcode, reg: Field, byte: Bool, imm: Int = 0, access: Int = 0, write: Bool = false,
                    writesReg: Bool = false, writesRM: Bool = false, reads: Bool = false, writes: Bool = false,
                    partial: Bool = false) -> TranslationPlan? {
            p.opcode = opcode
            p.regField = reg
            p.byteRegisters = byte
            p.immediateSize = imm
            p.readsFlags = reads
            p.writesFlags = writes || partial
            p.partialFlags = partial
            if case let .guest(g) = reg {
                if byte && !i.hasREX && g >= 4 { return nil }  // AH/CH/DH/BH
                p.used |= 1 << g
                if writesReg { p.written |= 1 << g }
            }
            if isMem {
                p.memorySize = access == 0 ? (byte ? 1 : Int(w)) : access
                p.memoryWrite = write
                p.addAddressRegisters(i)
            } else {
                let g = Int(i.rm)
                if byte && !i.hasREX && g >= 4 { return nil }
                p.rmGuest = g
                p.used |= 1 << g
                if writesRM { p.written |= 1 << g }
            }
            return p
        }
        let mod3 = !isMem

        switch op {
        case 0x00...0x3F where op & 7 <= 5:
            let alu = op >> 3
            let byte = op & 1 == 0
            let carry = alu == 2 || alu == 3
            switch op & 7 {
            case 0, 1:
                return native(HostOpcode(UInt8(op)), reg: .guest(Int(i.reg)), byte: byte, write: alu != 7, writesRM: alu != 7, reads: carry, writes: true)
            case 2, 3:
                return native(HostOpcode(UInt8(op)), reg: .guest(Int(i.reg)), byte: byte, writesReg: alu != 7, reads: carry, writes: true)
            default:
                // AL/eAX, imm: as group 1 on the cached RAX.
                p.opcode = HostOpcode(byte ? 0x80 : 0x81)
                p.regField = .ext(alu)
                p.byteRegisters = byte
                p.immediateSize = byte ? 1 : zSize
                p.rmGuest = 0
                p.used = 1
                p.written = alu != 7 ? 1 : 0
                p.readsFlags = carry
                p.writesFlags = true
                return p
            }
        case 0x63:
            return native(HostOpcode(0x63), reg: .guest(Int(i.reg)), byte: false, access: 4, writesReg: true)
        case 0x69, 0x6B:
            return native(HostOpcode(UInt8(op)), reg: .guest(Int(i.reg)), byte: false, imm: op == 0x6B ? 1 : zSize, writesReg: true, partial: true)
        case 0x80, 0x81, 0x83:
            let ext = i.ext
            return native(HostOpcode(UInt8(op)), reg: .ext(ext), byte: op == 0x80, imm: op == 0x81 ? zSize : 1, write: ext != 7,
                          writesRM: ext != 7, reads: ext == 2 || ext == 3, writes: true)
        case 0x84, 0x85:
            return native(HostOpcode(UInt8(op)), reg: .guest(Int(i.reg)), byte: op == 0x84, writes: true)
        case 0x86, 0x87:
            if isMem && sharedMemory { return nil }  // atomic: serialised with LOCK instructions
            return native(HostOpcode(UInt8(op)), reg: .guest(Int(i.reg)), byte: op == 0x86, write: true, writesReg: true, writesRM: true)
        case 0x88, 0x89:
            return native(HostOpcode(UInt8(op)), reg: .guest(Int(i.reg)), byte: op == 0x88, write: true, writesRM: true)
        case 0x8A, 0x8B:
            return native(HostOpcode(UInt8(op)), reg: .guest(Int(i.reg)), byte: op == 0x8A, writesReg: true)
        case 0x8D:
            guard isMem else { return nil }
            p.kind = .lea
            p.regField = .guest(Int(i.reg))
            p.used |= 1 << Int(i.reg)
            p.written |= 1 << Int(i.reg)
            p.addAddressRegisters(i)
            return p
        case 0x90 where i.reg == 0:
            p.kind = .nop
            return p
        case 0x98, 0x99:
            p.kind = op == 0x98 ? .extendAccumulator : .signExtendIntoDX
            p.used = op == 0x98 ? 1 : 0b101
            p.written = op == 0x98 ? 1 : 0b100
            return p
        case 0xA8, 0xA9:
            p.opcode = HostOpcode(op == 0xA8 ? 0xF6 : 0xF7)
            p.regField = .ext(0)
            p.byteRegisters = op == 0xA8
            p.immediateSize = op == 0xA8 ? 1 : zSize
            p.rmGuest = 0
            p.used = 1
            p.writesFlags = true
            return p
        case 0xB0...0xBF:
            let g = Int(i.reg)
            if op < 0xB8 && !i.hasREX && g >= 4 { return nil }
            p.kind = .movImmediate
            p.regField = .guest(g)
            p.byteRegisters = op < 0xB8
            p.used = 1 << g
            p.written = 1 << g
            return p
        case 0xC0, 0xC1, 0xD0, 0xD1, 0xD2, 0xD3:
            let ext = i.ext
            if ext == 6 { return nil }
            let byCL = op == 0xD2 || op == 0xD3
            let throughCarry = ext == 2 || ext == 3  // RCL, RCR
            guard var q = native(HostOpcode(UInt8(op)), reg: .ext(ext), byte: op & 1 == 0, imm: op <= 0xC1 ? 1 : 0, write: true,
                                 writesRM: true, reads: throughCarry, partial: true) else { return nil }
            if byCL { q.usesCL = true; q.used |= 1 << 1 }
            return q
        case 0xC6, 0xC7:
            guard i.ext == 0 else { return nil }
            return native(HostOpcode(UInt8(op)), reg: .ext(0), byte: op == 0xC6, imm: op == 0xC6 ? 1 : zSize, write: true, writesRM: true)
        case 0xF6, 0xF7:
            let ext = i.ext
            let byte = op == 0xF6
            switch ext {
            case 0, 1: return native(HostOpcode(UInt8(op)), reg: .ext(ext), byte: byte, imm: byte ? 1 : zSize, writes: true)
            case 2: return native(HostOpcode(UInt8(op)), reg: .ext(2), byte: byte, write: true, writesRM: true)
            case 3: return native(HostOpcode(UInt8(op)), reg: .ext(3), byte: byte, write: true, writesRM: true, writes: true)
            default:
                // MUL/IMUL/DIV/IDIV on RDX:RAX; the byte forms (AH:AL) stay interpreted.
                guard !byte, var q = native(HostOpcode(0xF7), reg: .ext(ext), byte: false, partial: ext <= 5) else { return nil }
                q.kind = .multiplyDivide
                q.used |= 0b101
                q.written |= 0b101
                q.mayFault = ext >= 6
                return q
            }
        case 0xFE, 0xFF:
            let ext = i.ext
            if ext <= 1 {
                return native(HostOpcode(UInt8(op)), reg: .ext(ext), byte: op == 0xFE, write: true, writesRM: true, partial: true)
            }
            guard op == 0xFF, !i.opsize16 else { return nil }
            switch ext {
            case 2, 4:
                p.kind = ext == 2 ? .callIndirect : .jmpIndirect
                p.used = ext == 2 ? 1 << 4 : 0
                p.written = p.used
                if isMem {
                    p.memorySize = 8
                    p.addAddressRegisters(i)
                    return p
                }
                p.rmGuest = Int(i.rm)
                p.used |= 1 << Int(i.rm)
                return p
            default: return nil
            }
        case 0x50...0x5F:
            guard !i.opsize16 else { return nil }
            p.kind = op < 0x58 ? .push : .pop
            p.regField = .guest(Int(i.reg))
            p.used = 1 << 4 | 1 << Int(i.reg)
            p.written = op < 0x58 ? 1 << 4 : (1 << 4 | 1 << Int(i.reg))
            return p
        case 0x68, 0x6A:
            guard !i.opsize16 else { return nil }
            p.kind = .pushImmediate
            p.used = 1 << 4
            p.written = 1 << 4
            return p
        case 0x70...0x7F, 0x180...0x18F:
            guard !i.opsize16 else { return nil }
            let target = next &+ i.imm
            guard CPU.isCanonical(target) else { return nil }
            p.kind = .jcc(cc: UInt8(op & 0xF), target: target)
            p.readsFlags = true
            return p
        case 0xE9, 0xEB:
            guard !i.opsize16 else { return nil }
            let target = next &+ i.imm
            guard CPU.isCanonical(target) else { return nil }
            p.kind = .jmp(target: target)
            return p
        case 0xE8:
            guard !i.opsize16 else { return nil }
            let target = next &+ i.imm
            guard CPU.isCanonical(target) else { return nil }
            p.kind = .call(target: target)
            p.used = 1 << 4
            p.written = 1 << 4
            return p
        case 0xC3:
            guard !i.opsize16 else { return nil }
            p.kind = .ret
            p.used = 1 << 4
            p.written = 1 << 4
            return p
        case 0x11F:
            p.kind = .nop
            return p
        case 0x140...0x14F:
            return native(HostOpcode(0x0F, UInt8(op & 0xFF)), reg: .guest(Int(i.reg)), byte: false, writesReg: true, reads: true)
        case 0x190...0x19F:
            return native(HostOpcode(0x0F, UInt8(op & 0xFF)), reg: .ext(0), byte: true, access: 1, write: true, writesRM: true, reads: true)
        case 0x1A3, 0x1AB, 0x1B3, 0x1BB:
            // The register bit offset reaches outside the operand for memory: interpret those.
            guard mod3 else { return nil }
            return native(HostOpcode(0x0F, UInt8(op & 0xFF)), reg: .guest(Int(i.reg)), byte: false, writesRM: op != 0x1A3, partial: true)
        case 0x1BA:
            let ext = i.ext
            guard ext >= 4 else { return nil }
            return native(HostOpcode(0x0F, 0xBA), reg: .ext(ext), byte: false, imm: 1, write: ext != 4, writesRM: ext != 4, partial: true)
        case 0x1A4, 0x1A5, 0x1AC, 0x1AD:
            guard var q = native(HostOpcode(0x0F, UInt8(op & 0xFF)), reg: .guest(Int(i.reg)), byte: false, imm: op & 1 == 0 ? 1 : 0,
                                 write: true, writesRM: true, partial: true) else { return nil }
            if op & 1 == 1 { q.usesCL = true; q.used |= 1 << 1 }
            return q
        case 0x1AF:
            return native(HostOpcode(0x0F, 0xAF), reg: .guest(Int(i.reg)), byte: false, writesReg: true, partial: true)
        case 0x1B6, 0x1B7, 0x1BE, 0x1BF:
            let byteSource = op & 1 == 0
            if byteSource && mod3 && !i.hasREX && i.rm >= 4 { return nil }
            return native(HostOpcode(0x0F, UInt8(op & 0xFF)), reg: .guest(Int(i.reg)), byte: false, access: byteSource ? 1 : 2, writesReg: true)
                .map { var q = $0; q.byteRegisters = byteSource; return q }
        case 0x1B8, 0x1BC, 0x1BD:
            guard var q = native(HostOpcode(0x0F, UInt8(op & 0xFF)), reg: .guest(Int(i.reg)), byte: false, writesReg: true, partial: true)
            else { return nil }
            q.prefixF3 = i.rep == 0xF3
            return q
        case 0x1C0, 0x1C1:
            return native(HostOpcode(0x0F, UInt8(op & 0xFF)), reg: .guest(Int(i.reg)), byte: op == 0x1C0, write: true, writesReg: true, writesRM: true,
                          writes: true)
        case 0x1C8...0x1CF:
            guard !i.opsize16 else { return nil }
            p.kind = .bswap
            p.regField = .guest(Int(i.reg))
            p.used = 1 << Int(i.reg)
            p.written = p.used
            return p
        default:
            return nil
        }
    }

    /// Adds the memory operand's base and index registers.
    mutating func addAddressRegisters(_ i: Instr) {
        if i.base < 16 { used |= 1 << Int(i.base) }
        if i.index < 16 { used |= 1 << Int(i.index) }
    }
}
