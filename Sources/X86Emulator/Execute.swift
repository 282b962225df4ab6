import VirtCore

extension CPU {
    /// Retires the instruction: RIP moves on.
    @inline(__always)
    func commit(_ next: UInt64) {
        rip = next
        instructions &+= 1
    }

    /// A near branch target: non-canonical targets fault on the branch (#GP), as on hardware.
    @inline(__always)
    func branch(_ target: UInt64) throws(Fault) -> UInt64 {
        guard Self.isCanonical(target) else { throw Fault.gp() }
        return target
    }

    /// Stops the run loop after this instruction with `exit`.
    @inline(__always)
    func exit(_ e: VMExit) {
        pendingExit = e
        attention = true
    }

    /// Executes one decoded instruction at RIP. On a fault nothing is committed and RIP
    /// stays put (REP string instructions keep the iterations they completed).
    func execute(_ i: Instr) throws(Fault) {
        var next = rip &+ UInt64(i.length)
        let op = Int(i.op)
        let rex = i.hasREX
        switch op {
        case 0x00...0x3F:  // ALU: op r/m,r / op r,r/m / op AL|eAX,imm  (invalid ones never decode)
            let aluOp = op >> 3
            let size = op & 1 == 0 ? 1 : i.size
            switch op & 7 {
            case 0, 1:
                let src = reg(Int(i.reg), size, rex)
                if i.isMem {
                    let a = ea(i)
                    let saved = rflags
                    let r = alu(aluOp, try read(a, size: size), src, size)
                    if aluOp != 7 { try writeBack(a, r, size, flags: saved) }
                } else {
                    let r = alu(aluOp, reg(Int(i.rm), size, rex), src, size)
                    if aluOp != 7 { setReg(Int(i.rm), size, r, rex) }
                }
            case 2, 3:
                let r = alu(aluOp, reg(Int(i.reg), size, rex), try readRM(i, size), size)
                if aluOp != 7 { setReg(Int(i.reg), size, r, rex) }
            default:
                let r = alu(aluOp, reg(0, size, rex), i.imm & Self.mask(size), size)
                if aluOp != 7 { setReg(0, size, r, rex) }
            }
        case 0x50...0x57:
            if i.opsize16 { try push(gpr[Int(i.reg)] & 0xFFFF, size: 2) } else { try push(gpr[Int(i.reg)]) }
        case 0x58...0x5F:
            if i.opsize16 { setReg(Int(i.reg), 2, try pop(size: 2), rex) } else { gpr[Int(i.reg)] = try pop() }
        case 0x63:  // MOVSXD (without REX.W: a plain 32/16-bit move)
            let v = try readRM(i, i.size == 2 ? 2 : 4)
            setReg(Int(i.reg), i.size, i.rexW ? Self.signExtend(v, 4) : v, rex)
        case 0x68, 0x6A:
            if i.opsize16 { try push(i.imm & 0xFFFF, size: 2) } else { try push(i.imm) }
        case 0x69, 0x6B:  // IMUL r, r/m, imm
            setReg(Int(i.reg), i.size, imul(try readRM(i, i.size), i.imm, i.size), rex)
        case 0x6C...0x6F:
            try stringPortIO(i, &next)
        case 0x70...0x7F:
            if condition(op & 0xF) { next = try branch(next &+ i.imm) }
        case 0x80, 0x81, 0x83:
            let size = op == 0x80 ? 1 : i.size
            let aluOp = i.ext
            let imm = i.imm & Self.mask(size)
            if i.isMem {
                let a = ea(i)
                let saved = rflags
                let r = alu(aluOp, try read(a, size: size), imm, size)
                if aluOp != 7 { try writeBack(a, r, size, flags: saved) }
            } else {
                let r = alu(aluOp, reg(Int(i.rm), size, rex), imm, size)
                if aluOp != 7 { setReg(Int(i.rm), size, r, rex) }
            }
        case 0x84, 0x85:
            let size = op == 0x84 ? 1 : i.size
            _ = alu(4, try readRM(i, size), reg(Int(i.reg), size, rex), size)
        case 0x86, 0x87:
            let size = op == 0x86 ? 1 : i.size
            if i.isMem {
                let a = ea(i)
                let old = try read(a, size: size)
                try write(a, reg(Int(i.reg), size, rex), size: size)
                setReg(Int(i.reg), size, old, rex)
            } else {
                let old = reg(Int(i.rm), size, rex)
                setReg(Int(i.rm), size, reg(Int(i.reg), size, rex), rex)
                setReg(Int(i.reg), size, old, rex)
            }
        case 0x88, 0x89:
            let size = op == 0x88 ? 1 : i.size
            try writeRM(i, size, reg(Int(i.reg), size, rex))
        case 0x8A, 0x8B:
            let size = op == 0x8A ? 1 : i.size
            setReg(Int(i.reg), size, try readRM(i, size), rex)
        case 0x8C:  // MOV r/m, Sreg
            let sel: UInt16
            switch i.ext {
            case 0: sel = es.selector
            case 1: sel = cs.selector
            case 2: sel = ss.selector
            case 3: sel = ds.selector
            case 4: sel = fs.selector
            case 5: sel = gs.selector
            default: throw Fault.ud
            }
            try writeRM(i, i.isMem ? 2 : i.size, UInt64(sel))
        case 0x8D:  // LEA (no segment base)
            guard i.isMem else { throw Fault.ud }
            var a = i.disp
            let b = Int(i.base)
            if b < 16 { a &+= gpr[b] } else if b == 17 { a &+= next }
            if i.index < 16 { a &+= gpr[Int(i.index)] &<< UInt64(i.scale) }
            if i.addr32 { a &= 0xFFFF_FFFF }
            setReg(Int(i.reg), i.size, a & Self.mask(i.size), rex)
        case 0x8E:  // MOV Sreg, r/m
            let n = i.ext
            guard n != 1 && n <= 5 else { throw Fault.ud }
            try loadSegment(n, UInt16(truncatingIfNeeded: try readRM(i, 2)))
            if n == 2 { interruptShadow = true; attention = true }
        case 0x8F:  // POP r/m (the address is computed with RSP already incremented)
            guard i.ext == 0 else { throw Fault.ud }
            let size = i.opsize16 ? 2 : 8
            let v = try read(gpr[4], size: size)
            let saved = gpr[4]
            gpr[4] &+= UInt64(size)
            do { try writeRM(i, size, v) } catch { gpr[4] = saved; throw error }
        case 0x90:
            if i.reg == 8 {  // XCHG r8, rAX
                let a = reg(0, i.size, rex), b = reg(8, i.size, rex)
                setReg(0, i.size, b, rex); setReg(8, i.size, a, rex)
            } else if i.rep == 0xF3 {
                spinWaitHint()  // PAUSE
            }  // else NOP
        case 0x91...0x97:
            let n = Int(i.reg)
            let a = reg(0, i.size, rex), b = reg(n, i.size, rex)
            setReg(0, i.size, b, rex); setReg(n, i.size, a, rex)
        case 0x98:  // CBW/CWDE/CDQE
            switch i.size {
            case 2: setReg(0, 2, Self.signExtend(gpr[0], 1), rex)
            case 4: setReg(0, 4, Self.signExtend(gpr[0], 2), rex)
            default: gpr[0] = Self.signExtend(gpr[0], 4)
            }
        case 0x99:  // CWD/CDQ/CQO
            let negative = reg(0, i.size, rex) & Self.sign(i.size) != 0
            setReg(2, i.size, negative ? ~0 : 0, rex)
        case 0x9B:  // FWAIT
            try waitForFPU()
        case 0x9C:  // PUSHF (VM and RF read as 0)
            let v = rflags & ~(Flag.rf | Flag.vm)
            if i.opsize16 { try push(v & 0xFFFF, size: 2) } else { try push(v) }
        case 0x9D:  // POPF
            let size = i.opsize16 ? 2 : 8
            let v = try pop(size: size)
            var changeable: UInt64 = Flag.arithmetic | Flag.tf | Flag.df | Flag.nt | Flag.ac | Flag.id
            if cpl == 0 { changeable |= Flag.iopl }
            if cpl <= UInt8((rflags >> 12) & 3) { changeable |= Flag.if }
            if size == 2 { changeable &= 0xFFFF }
            let wasIF = rflags & Flag.if
            rflags = (rflags & ~changeable) | (v & changeable) | 0x2
            if wasIF == 0 && rflags & Flag.if != 0 { attention = true }
        case 0x9E:  // SAHF
            rflags = (rflags & ~0xD5) | ((gpr[0] >> 8) & 0xD5) | 0x2
        case 0x9F:  // LAHF
            gpr[0] = (gpr[0] & ~0xFF00) | ((rflags & 0xD7 | 0x2) << 8)
        case 0xA0...0xA3:  // MOV AL/eAX ↔ moffs
            let size = op & 1 == 0 ? 1 : i.size
            let address = i.imm &+ (i.seg == 0 ? 0 : i.seg == 1 ? fs.base : gs.base)
            if op <= 0xA1 { setReg(0, size, try read(address, size: size), rex) } else { try write(address, reg(0, size, rex), size: size) }
        case 0xA4...0xA7, 0xAA...0xAF:
            try stringOp(i, &next)
        case 0xA8, 0xA9:
            let size = op == 0xA8 ? 1 : i.size
            _ = alu(4, reg(0, size, rex), i.imm & Self.mask(size), size)
        case 0xB0...0xB7:
            setReg(Int(i.reg), 1, i.imm, rex)
        case 0xB8...0xBF:
            setReg(Int(i.reg), i.size, i.imm, rex)
        case 0xC0, 0xC1, 0xD0, 0xD1, 0xD2, 0xD3:
            let size = op & 1 == 0 ? 1 : i.size
            let count: UInt64 = op <= 0xC1 ? i.imm & 0xFF : (op <= 0xD1 ? 1 : gpr[1] & 0xFF)
            if i.isMem {
                let a = ea(i)
                let saved = rflags
                let r = shift(i.ext, try read(a, size: size), count, size)
                try writeBack(a, r, size, flags: saved)
            } else {
                setReg(Int(i.rm), size, shift(i.ext, reg(Int(i.rm), size, rex), count, size), rex)
            }
        case 0xC2, 0xC3:  // RET near [imm16]
            let target = try read(gpr[4], size: 8)
            next = try branch(target)
            gpr[4] &+= 8 &+ (op == 0xC2 ? i.imm : 0)
        case 0xC6, 0xC7:
            guard i.ext == 0 else { throw Fault.ud }
            let size = op == 0xC6 ? 1 : i.size
            try writeRM(i, size, i.imm & Self.mask(size))
        case 0xC8:
            try enter(i)
        case 0xC9:  // LEAVE
            let v = try read(gpr[5], size: 8)
            gpr[4] = gpr[5] &+ 8
            gpr[5] = v
        case 0xCA, 0xCB:  // far return
            next = try farReturn(i)
        case 0xCC:
            commit(next)
            throw Fault.softwareInterrupt(vector: 3, checkDPL: true, length: i.length)
        case 0xCD:
            commit(next)
            throw Fault.softwareInterrupt(vector: UInt8(i.imm & 0xFF), checkDPL: true, length: i.length)
        case 0xCF:
            try iret(size: i.rexW ? 8 : (i.opsize16 ? 2 : 4))
            instructions &+= 1
            attention = true
            return
        case 0xD8...0xDF:
            try executeX87(i)
        case 0xD7:  // XLAT
            var a = gpr[3] &+ (gpr[0] & 0xFF)
            if i.addr32 { a &= 0xFFFF_FFFF }
            a &+= i.seg == 0 ? 0 : (i.seg == 1 ? fs.base : gs.base)
            setReg(0, 1, try read(a, size: 1), rex)
        case 0xE0...0xE3:  // LOOPNE, LOOPE, LOOP, JRCXZ
            let m: UInt64 = i.addr32 ? 0xFFFF_FFFF : ~0
            var count = gpr[1] & m
            let taken: Bool
            if op == 0xE3 {
                taken = count == 0
            } else {
                count = (count &- 1) & m
                let zf = rflags & Flag.zf != 0
                taken = count != 0 && (op == 0xE2 || (op == 0xE1 ? zf : !zf))
            }
            let target = taken ? try branch(next &+ i.imm) : next
            if op != 0xE3 { gpr[1] = count }
            next = target
        case 0xE4, 0xE5, 0xEC, 0xED:  // IN
            let port = op <= 0xE5 ? UInt16(i.imm & 0xFF) : UInt16(truncatingIfNeeded: gpr[2])
            let size = op & 1 == 0 ? 1 : (i.opsize16 ? 2 : 4)
            try checkIOPermission(port, size)
            pendingInSize = size
            exit(.portIO(PortAccess(port: port, size: UInt8(size), direction: .read)))
        case 0xE6, 0xE7, 0xEE, 0xEF:  // OUT
            let port = op <= 0xE7 ? UInt16(i.imm & 0xFF) : UInt16(truncatingIfNeeded: gpr[2])
            let size = op & 1 == 0 ? 1 : (i.opsize16 ? 2 : 4)
            try checkIOPermission(port, size)
            exit(.portIO(PortAccess(port: port, size: UInt8(size), direction: .write,
                                    value: UInt32(truncatingIfNeeded: gpr[0] & Self.mask(size)))))
        case 0xE8:
            let target = try branch(next &+ i.imm)
            try push(next)
            next = target
        case 0xE9, 0xEB:
            next = try branch(next &+ i.imm)
        case 0xF1:  // INT1
            commit(next)
            throw Fault.softwareInterrupt(vector: 1, checkDPL: false, length: i.length)
        case 0xF4:
            guard cpl == 0 else { throw Fault.gp() }
            exit(.halt)
        case 0xF5: rflags ^= Flag.cf
        case 0xF6, 0xF7:
            try group3(op == 0xF6 ? 1 : i.size, i)
        case 0xF8: rflags &= ~Flag.cf
        case 0xF9: rflags |= Flag.cf
        case 0xFA:
            guard cpl <= UInt8((rflags >> 12) & 3) else { throw Fault.gp() }
            rflags &= ~Flag.if
        case 0xFB:
            guard cpl <= UInt8((rflags >> 12) & 3) else { throw Fault.gp() }
            if rflags & Flag.if == 0 {
                rflags |= Flag.if
                interruptShadow = true
                attention = true
            }
        case 0xFC: rflags &= ~Flag.df
        case 0xFD: rflags |= Flag.df
        case 0xFE, 0xFF:
            let size = op == 0xFE ? 1 : i.size
            switch i.ext {
            case 0, 1:  // INC, DEC (CF unchanged)
                let cf = rflags & Flag.cf
                let saved = rflags
                if i.isMem {
                    let a = ea(i)
                    let r = alu(i.ext == 0 ? 0 : 5, try read(a, size: size), 1, size)
                    rflags = (rflags & ~Flag.cf) | cf
                    try writeBack(a, r, size, flags: saved)
                } else {
                    let r = alu(i.ext == 0 ? 0 : 5, reg(Int(i.rm), size, rex), 1, size)
                    rflags = (rflags & ~Flag.cf) | cf
                    setReg(Int(i.rm), size, r, rex)
                }
            case 2 where op == 0xFF:  // CALL r/m64
                let target = try branch(try readRM(i, 8))
                try push(next)
                next = target
            case 3 where op == 0xFF && i.isMem:  // CALL far m16:32/64
                next = try farCall(i, next)
            case 4 where op == 0xFF:  // JMP r/m64
                next = try branch(try readRM(i, 8))
            case 5 where op == 0xFF && i.isMem:  // JMP far m16:32/64
                next = try farJump(i)
            case 6 where op == 0xFF:  // PUSH r/m
                if i.opsize16 { try push(try readRM(i, 2), size: 2) } else { try push(try readRM(i, 8)) }
            default:
                throw Fault.ud
            }
        default:
            if op >= 0x100 {
                try executeTwoByte(i, &next)
            } else {
                throw Fault.ud
            }
        }
        commit(next)
    }

    private func group3(_ size: Int, _ i: Instr) throws(Fault) {
        let rex = i.hasREX
        switch i.ext {
        case 0, 1:  // TEST r/m, imm
            _ = alu(4, try readRM(i, size), i.imm & Self.mask(size), size)
        case 2:  // NOT (no flags)
            if i.isMem {
                let a = ea(i)
                try write(a, ~(try read(a, size: size)) & Self.mask(size), size: size)
            } else {
                setReg(Int(i.rm), size, ~reg(Int(i.rm), size, rex) & Self.mask(size), rex)
            }
        case 3:  // NEG
            if i.isMem {
                let a = ea(i)
                let saved = rflags
                let r = alu(5, 0, try read(a, size: size), size)
                try writeBack(a, r, size, flags: saved)
            } else {
                setReg(Int(i.rm), size, alu(5, 0, reg(Int(i.rm), size, rex), size), rex)
            }
        case 4, 5:  // MUL, IMUL (one operand)
            let b = try readRM(i, size)
            let a = reg(0, size, rex)
            let bits = 8 * size
            var low: UInt64, high: UInt64
            if i.ext == 5 {
                let sa = Int64(bitPattern: Self.signExtend(a, size))
                let sb = Int64(bitPattern: Self.signExtend(b, size))
                let overflow: Bool
                if size == 8 {
                    let (h, l) = sa.multipliedFullWidth(by: sb)
                    low = l; high = UInt64(bitPattern: h)
                    overflow = h != (Int64(bitPattern: l) >> 63)
                } else {
                    let p = sa &* sb  // cannot overflow for 32-bit operands
                    low = UInt64(bitPattern: p) & Self.mask(size); high = (UInt64(bitPattern: p) >> UInt64(bits)) & Self.mask(size)
                    overflow = Int64(bitPattern: Self.signExtend(low, size)) != p
                }
                rflags = (rflags & ~(Flag.cf | Flag.of)) | (overflow ? Flag.cf | Flag.of : 0)
            } else {
                let (h, l) = a.multipliedFullWidth(by: b)
                if size == 8 { low = l; high = h } else { low = l & Self.mask(size); high = (l >> UInt64(bits)) & Self.mask(size) }
                rflags = (rflags & ~(Flag.cf | Flag.of)) | (high != 0 ? Flag.cf | Flag.of : 0)
            }
            if size == 1 { setReg(0, 2, (high << 8) | low, rex) } else { setReg(0, size, low, rex); setReg(2, size, high, rex) }
        default:  // DIV, IDIV
            let divisor = try readRM(i, size)
            guard divisor != 0 else { throw Fault.de }
            let bits = UInt64(8 * size)
            let hi = size == 1 ? (gpr[0] >> 8) & 0xFF : reg(2, size, rex)
            let lo = size == 1 ? gpr[0] & 0xFF : reg(0, size, rex)
            var q: UInt64, r: UInt64
            if i.ext == 6 {
                guard hi < divisor else { throw Fault.de }
                if size == 8 { (q, r) = divisor.dividingFullWidth((hi, lo)) } else {
                    let n = (hi << bits) | lo
                    q = n / divisor; r = n % divisor
                }
            } else {
                let sd = Int64(bitPattern: Self.signExtend(divisor, size))
                if size == 8 {
                    let negative = Int64(bitPattern: hi) < 0
                    // |dividend| as 128 bits, |divisor| as 64 (|INT64_MIN| fits unsigned).
                    let magnitude: (UInt64, UInt64)
                    if negative {
                        let l = ~lo &+ 1
                        magnitude = (~hi &+ (l == 0 ? 1 : 0), l)
                    } else {
                        magnitude = (hi, lo)
                    }
                    let dm = sd < 0 ? ~UInt64(bitPattern: sd) &+ 1 : UInt64(sd)
                    guard magnitude.0 < dm else { throw Fault.de }
                    let (uq, ur) = dm.dividingFullWidth(magnitude)
                    let qNegative = negative != (sd < 0)
                    guard uq <= (qNegative ? UInt64(1) << 63 : UInt64(Int64.max)) else { throw Fault.de }
                    q = qNegative ? ~uq &+ 1 : uq
                    r = negative ? ~ur &+ 1 : ur
                } else {
                    let n = Int64(bitPattern: ((hi << bits) | lo) << (64 - 2 * bits)) >> Int64(64 - 2 * bits)
                    let (sq, quotientOverflow) = n.dividedReportingOverflow(by: sd)
                    guard !quotientOverflow else { throw Fault.de }
                    let sr = n.remainderReportingOverflow(dividingBy: sd).partialValue
                    let limit = Int64(1) << Int64(bits - 1)
                    guard sq >= -limit && sq < limit else { throw Fault.de }
                    q = UInt64(bitPattern: sq) & Self.mask(size); r = UInt64(bitPattern: sr) & Self.mask(size)
                }
            }
            if size == 1 { setReg(0, 2, (r << 8) | (q & 0xFF), rex) } else { setReg(0, size, q, rex); setReg(2, size, r, rex) }
        }
    }

    private func enter(_ i: Instr) throws(Fault) {
        let frameSize = i.imm & 0xFFFF
        let level = UInt64(i.imm2 & 31)
        var rsp = gpr[4] &- 8
        try write(rsp, gpr[5], size: 8)
        let frame = rsp
        if level > 0 {
            var rbp = gpr[5]
            for _ in 1..<level {
                rbp &-= 8
                rsp &-= 8
                try write(rsp, try read(rbp, size: 8), size: 8)
            }
            rsp &-= 8
            try write(rsp, frame, size: 8)
        }
        gpr[5] = frame
        gpr[4] = rsp &- frameSize
    }

    // MARK: String instructions

    /// Iterations done per execution of a REP instruction before the run loop gets a look
    /// in (the instruction is restarted with RCX/RSI/RDI as left, like an interrupted REP).
    static let repChunk: UInt64 = 4096

    private func stringOp(_ i: Instr, _ next: inout UInt64) throws(Fault) {
        let op = Int(i.op)
        let size = op & 1 == 0 ? 1 : i.size
        let m: UInt64 = i.addr32 ? 0xFFFF_FFFF : ~0
        let step = rflags & Flag.df != 0 ? UInt64(bitPattern: -Int64(size)) : UInt64(size)
        let segBase: UInt64 = i.seg == 0 ? 0 : (i.seg == 1 ? fs.base : gs.base)
        let rex = i.hasREX
        if i.rep == 0 {
            try stringElement(op, size, step, m, segBase, rex)
            return
        }
        var budget = Self.repChunk
        while gpr[1] & m != 0 {
            if budget == 0 || pendingMMIOWrite != nil {  // resume later, not retired yet
                next = rip
                instructions &-= 1
                return
            }
            if step == UInt64(size) && (op & 0xFE == 0xA4 || op & 0xFE == 0xAA) {
                let done = try bulkString(op, size, m, segBase, rex, budget: budget)
                if done != 0 { budget -= done; continue }
            }
            budget -= 1
            try stringElement(op, size, step, m, segBase, rex)
            gpr[1] = (gpr[1] &- 1) & m
            if holdsMMIOReads { dropHeldMMIOReads() }  // the element's MMIO values are used up
            if op == 0xA6 || op == 0xA7 || op == 0xAE || op == 0xAF {
                let zf = rflags & Flag.zf != 0
                if (i.rep == 0xF3 && !zf) || (i.rep == 0xF2 && zf) { break }
            }
        }
    }

    @inline(__always)
    private func stringElement(_ op: Int, _ size: Int, _ step: UInt64, _ m: UInt64, _ segBase: UInt64, _ rex: Bool) throws(Fault) {
        let si = gpr[6] & m, di = gpr[7] & m
        switch op {
        case 0xA4, 0xA5:  // MOVS
            try write(di, try read(si &+ segBase, size: size), size: size)
            gpr[6] = (si &+ step) & m; gpr[7] = (di &+ step) & m
        case 0xA6, 0xA7:  // CMPS
            let a = try read(si &+ segBase, size: size)
            let b = try read(di, size: size)
            _ = alu(7, a, b, size)
            gpr[6] = (si &+ step) & m; gpr[7] = (di &+ step) & m
        case 0xAA, 0xAB:  // STOS
            try write(di, reg(0, size, rex), size: size)
            gpr[7] = (di &+ step) & m
        case 0xAC, 0xAD:  // LODS
            setReg(0, size, try read(si &+ segBase, size: size), rex)
            gpr[6] = (si &+ step) & m
        default:  // SCAS
            let b = try read(di, size: size)
            _ = alu(7, reg(0, size, rex), b, size)
            gpr[7] = (di &+ step) & m
        }
    }

    /// INS/OUTS: one element per exit. A REP form keeps RIP on the instruction until RCX
    /// reaches zero, so each element is an ordinary port exit.
    private func stringPortIO(_ i: Instr, _ next: inout UInt64) throws(Fault) {
        let op = Int(i.op)
        let size = op & 1 == 0 ? 1 : (i.opsize16 ? 2 : 4)
        let port = UInt16(truncatingIfNeeded: gpr[2])
        try checkIOPermission(port, size)
        let m: UInt64 = i.addr32 ? 0xFFFF_FFFF : ~0
        let step = rflags & Flag.df != 0 ? UInt64(bitPattern: -Int64(size)) : UInt64(size)
        if i.rep != 0 && gpr[1] & m == 0 { return }
        if op >= 0x6E {  // OUTS
            let segBase: UInt64 = i.seg == 0 ? 0 : (i.seg == 1 ? fs.base : gs.base)
            let v = try read((gpr[6] & m) &+ segBase, size: size)
            gpr[6] = ((gpr[6] & m) &+ step) & m
            exit(.portIO(PortAccess(port: port, size: UInt8(size), direction: .write, value: UInt32(truncatingIfNeeded: v))))
        } else {  // INS: first ask for the value, then store it when re-executed
            guard let v = pendingInsValue else {
                awaitingInsValue = true
                exit(.portIO(PortAccess(port: port, size: UInt8(size), direction: .read)))
                next = rip
                instructions &-= 1  // not retired: commit() below counts it
                return
            }
            try write(gpr[7] & m, v, size: size)
            pendingInsValue = nil
            gpr[7] = ((gpr[7] & m) &+ step) & m
        }
        if i.rep != 0 {
            gpr[1] = ((gpr[1] & m) &- 1) & m
            if gpr[1] != 0 {
                next = rip
                instructions &-= 1
            }
        }
    }

    /// IN/OUT/INS/OUTS at CPL > IOPL consult the TSS's I/O permission bitmap.
    func checkIOPermission(_ port: UInt16, _ size: Int) throws(Fault) {
        if cpl <= UInt8((rflags >> 12) & 3) { return }
        guard tr.present, tr.limit >= 0x67 else { throw Fault.gp() }
        let mapBase = try readSystem(tr.base &+ 0x66, size: 2)
        let byteOffset = mapBase &+ UInt64(port >> 3)
        guard byteOffset &+ 1 <= UInt64(tr.limit) else { throw Fault.gp() }
        let bits = try readSystem(tr.base &+ byteOffset, size: 2)
        let maskBits = ((UInt64(1) << UInt64(size)) - 1) << UInt64(port & 7)
        if bits & maskBits != 0 { throw Fault.gp() }
    }
}
