import VirtCore

extension CPU {
    /// Executes one instruction. On a fault nothing is committed and RIP stays put.
    func step() throws(Fault) -> StepOutcome {
        var d = Decoded()
        d.start = rip
        var pos = rip
        var op: UInt64
        var locked = false
        // Prefixes (legacy, then REX immediately before the opcode).
        while true {
            op = try fetch8(&d, &pos)
            switch op {
            case 0x66: d.opsize16 = true
            case 0x67, 0x2E, 0x3E, 0x26, 0x36: break  // address-size and null segment prefixes
            case 0xF0: locked = true
            case 0xF2, 0xF3: d.rep = UInt8(op)
            case 0x64: d.segmentBase = fs.base
            case 0x65: d.segmentBase = gs.base
            default:
                if op & 0xF0 == 0x40 {
                    d.rex = UInt8(op & 0xF)
                    d.hasREX = true
                    op = try fetch8(&d, &pos)
                }
                if locked || op == 0x86 || op == 0x87 {
                    return try atomicLock.mutex.withLock { _ throws(Fault) in try execute(Int(op), &d, &pos) }
                }
                return try execute(Int(op), &d, &pos)
            }
            if pos &- d.start > 15 { throw Fault.gp() }
        }
    }

    /// Commits the instruction: RIP moves on, and an MMIO write it made is reported.
    @inline(__always)
    func finish(_ pos: UInt64) -> StepOutcome {
        rip = pos
        instructions &+= 1
        if let w = pendingMMIOWrite {
            pendingMMIOWrite = nil
            return .exit(.mmio(w))
        }
        return .next
    }

    private func execute(_ op: Int, _ d: inout Decoded, _ pos: inout UInt64) throws(Fault) -> StepOutcome {
        pendingMMIOWrite = nil
        switch op {
        case 0x00...0x3F where op & 7 < 6:
            let aluOp = op >> 3
            let size = op & 1 == 0 ? 1 : d.size
            switch op & 7 {
            case 0, 1:  // op r/m, r
                try decodeModRM(&d, &pos)
                let r = alu(aluOp, try readRM(d, pos, size), reg(d.reg, size, d), size)
                if aluOp != 7 { try writeRM(d, pos, size, r) }
            case 2, 3:  // op r, r/m
                try decodeModRM(&d, &pos)
                let r = alu(aluOp, reg(d.reg, size, d), try readRM(d, pos, size), size)
                if aluOp != 7 { setReg(d.reg, size, r, d) }
            default:  // op AL/eAX, imm
                let imm = try fetchSigned(&d, &pos, min(size, 4)) & Self.mask(size)
                let r = alu(aluOp, reg(0, size, d), imm, size)
                if aluOp != 7 { setReg(0, size, r, d) }
            }
        case 0x50...0x57:
            try push(gpr[(op & 7) | (d.rex & 1 != 0 ? 8 : 0)])
        case 0x58...0x5F:
            let v = try pop()
            gpr[(op & 7) | (d.rex & 1 != 0 ? 8 : 0)] = v
        case 0x63:  // MOVSXD
            try decodeModRM(&d, &pos)
            let v = try readRM(d, pos, 4)
            setReg(d.reg, d.size, d.rexW ? UInt64(bitPattern: Int64(Int32(truncatingIfNeeded: v))) : v, d)
        case 0x68: try push(try fetchSigned(&d, &pos, 4))
        case 0x6A: try push(try fetchSigned(&d, &pos, 1))
        case 0x69, 0x6B:  // IMUL r, r/m, imm
            try decodeModRM(&d, &pos)
            let imm = try fetchSigned(&d, &pos, op == 0x69 ? min(d.size, 4) : 1)
            setReg(d.reg, d.size, imul(try readRM(d, pos, d.size), imm, d.size), d)
        case 0x70...0x7F:
            let rel = try fetchSigned(&d, &pos, 1)
            if condition(op & 0xF) { pos &+= rel }
        case 0x80, 0x81, 0x83:
            let size = op == 0x80 ? 1 : d.size
            try decodeModRM(&d, &pos)
            let imm = try fetchSigned(&d, &pos, op == 0x81 ? min(size, 4) : 1) & Self.mask(size)
            let r = alu(d.reg & 7, try readRM(d, pos, size), imm, size)
            if d.reg & 7 != 7 { try writeRM(d, pos, size, r) }
        case 0x84, 0x85:
            let size = op == 0x84 ? 1 : d.size
            try decodeModRM(&d, &pos)
            _ = alu(4, try readRM(d, pos, size), reg(d.reg, size, d), size)
        case 0x86, 0x87:
            let size = op == 0x86 ? 1 : d.size
            try decodeModRM(&d, &pos)
            let a = try readRM(d, pos, size)
            try writeRM(d, pos, size, reg(d.reg, size, d))
            setReg(d.reg, size, a, d)
        case 0x88, 0x89:
            let size = op == 0x88 ? 1 : d.size
            try decodeModRM(&d, &pos)
            try writeRM(d, pos, size, reg(d.reg, size, d))
        case 0x8A, 0x8B:
            let size = op == 0x8A ? 1 : d.size
            try decodeModRM(&d, &pos)
            setReg(d.reg, size, try readRM(d, pos, size), d)
        case 0x8C:  // MOV r/m, Sreg
            try decodeModRM(&d, &pos)
            let sel: UInt16
            switch d.reg & 7 {
            case 0: sel = es.selector
            case 1: sel = cs.selector
            case 2: sel = ss.selector
            case 3: sel = ds.selector
            case 4: sel = fs.selector
            case 5: sel = gs.selector
            default: throw Fault.ud
            }
            try writeRM(d, pos, d.isRegister ? d.size : 2, UInt64(sel))
        case 0x8D:
            try decodeModRM(&d, &pos)
            guard !d.isRegister else { throw Fault.ud }
            setReg(d.reg, d.size, effectiveAddress(d, pos) &- d.segmentBase, d)
        case 0x8E:  // MOV Sreg, r/m
            try decodeModRM(&d, &pos)
            try loadSegment(d.reg & 7, UInt16(truncatingIfNeeded: try readRM(d, pos, 2)))
            if d.reg & 7 == 2 { interruptShadow = true }
        case 0x8F:
            try decodeModRM(&d, &pos)
            let v = try read(gpr[4], size: 8)
            let saved = gpr[4]
            gpr[4] &+= 8
            do { try writeRM(d, pos, 8, v) } catch { gpr[4] = saved; throw error }
        case 0x90:
            if d.rex & 1 != 0 { let t = gpr[8]; gpr[8] = gpr[0]; gpr[0] = t }  // XCHG r8, rax
        case 0x91...0x97:
            let n = (op & 7) | (d.rex & 1 != 0 ? 8 : 0)
            let a = reg(0, d.size, d), b = reg(n, d.size, d)
            setReg(0, d.size, b, d); setReg(n, d.size, a, d)
        case 0x98:  // CBW/CWDE/CDQE
            switch d.size {
            case 2: setReg(0, 2, UInt64(bitPattern: Int64(Int8(truncatingIfNeeded: gpr[0]))), d)
            case 4: setReg(0, 4, UInt64(bitPattern: Int64(Int16(truncatingIfNeeded: gpr[0]))), d)
            default: gpr[0] = UInt64(bitPattern: Int64(Int32(truncatingIfNeeded: gpr[0])))
            }
        case 0x99:  // CWD/CDQ/CQO
            let negative = reg(0, d.size, d) & Self.sign(d.size) != 0
            setReg(2, d.size, negative ? ~0 : 0, d)
        case 0x9C: try push(rflags & ~(Flag.rf | (1 << 17)))
        case 0x9D:
            let v = try pop()
            var changeable: UInt64 = Flag.arithmetic | Flag.tf | Flag.df | Flag.nt | Flag.ac | (1 << 21)
            if cpl == 0 { changeable |= Flag.iopl }
            if cpl <= UInt8((rflags >> 12) & 3) { changeable |= Flag.if }
            rflags = (rflags & ~changeable) | (v & changeable) | 0x2
        case 0x9E: rflags = (rflags & ~0xD5) | (gpr[0] >> 8 & 0xD5) | 0x2  // SAHF
        case 0x9F: setReg(4, 1, rflags & 0xD7, Decoded())  // LAHF into AH
        case 0xA0...0xA3:  // MOV AL/eAX ↔ [moffs64]
            let size = op & 1 == 0 ? 1 : d.size
            let address = try fetch(&d, &pos, 8) &+ d.segmentBase
            if op <= 0xA1 { setReg(0, size, try read(address, size: size), d) } else { try write(address, reg(0, size, d), size: size) }
        case 0xA8, 0xA9:
            let size = op == 0xA8 ? 1 : d.size
            _ = alu(4, reg(0, size, d), try fetchSigned(&d, &pos, min(size, 4)) & Self.mask(size), size)
        case 0x6C...0x6F:
            return try stringPortIO(op, &d, pos)
        case 0xA6, 0xA7, 0xAE, 0xAF:  // CMPS, SCAS with REPE/REPNE
            let size = op & 1 == 0 ? 1 : d.size
            let step = rflags & Flag.df != 0 ? UInt64(bitPattern: -Int64(size)) : UInt64(size)
            while d.rep == 0 || gpr[1] != 0 {
                let a = op <= 0xA7 ? try read(gpr[6] &+ d.segmentBase, size: size) : reg(0, size, d)
                let b = try read(gpr[7], size: size)
                _ = alu(7, a, b, size)
                if op <= 0xA7 { gpr[6] &+= step }
                gpr[7] &+= step
                if d.rep == 0 { break }
                gpr[1] &-= 1
                let zf = rflags & Flag.zf != 0
                if (d.rep == 0xF3 && !zf) || (d.rep == 0xF2 && zf) { break }
            }
        case 0xC8:  // ENTER imm16, imm8
            let frameSize = try fetch(&d, &pos, 2)
            let level = try fetch(&d, &pos, 1) & 31
            let rsp0 = gpr[4]
            var rsp = rsp0 &- 8
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
        case 0xA4, 0xA5, 0xAA, 0xAB, 0xAC, 0xAD:
            // An MMIO write stops a REP early: report it and resume from the same instruction.
            if try !stringOp(op, &d) { pos = d.start }
        case 0xB0...0xB7:
            setReg((op & 7) | (d.rex & 1 != 0 ? 8 : 0), 1, try fetch(&d, &pos, 1), d)
        case 0xB8...0xBF:
            let n = (op & 7) | (d.rex & 1 != 0 ? 8 : 0)
            setReg(n, d.size, try fetch(&d, &pos, d.size), d)
        case 0xC0, 0xC1, 0xD0, 0xD1, 0xD2, 0xD3:
            let size = op & 1 == 0 ? 1 : d.size
            try decodeModRM(&d, &pos)
            let count: UInt64 = op <= 0xC1 ? try fetch(&d, &pos, 1) : (op <= 0xD1 ? 1 : gpr[1] & 0xFF)
            let r = shift(d.reg & 7, try readRM(d, pos, size), count, size)
            try writeRM(d, pos, size, r)
        case 0xC2, 0xC3:
            let extra = op == 0xC2 ? try fetch(&d, &pos, 2) : 0
            let target = try read(gpr[4], size: 8)
            gpr[4] &+= 8 &+ extra
            pos = target
        case 0xC6, 0xC7:
            let size = op == 0xC6 ? 1 : d.size
            try decodeModRM(&d, &pos)
            let imm = try fetchSigned(&d, &pos, min(size, 4)) & Self.mask(size)
            try writeRM(d, pos, size, imm)
        case 0xC9:  // LEAVE
            let v = try read(gpr[5], size: 8)
            gpr[4] = gpr[5] &+ 8
            gpr[5] = v
        case 0xCA, 0xCB:  // far return
            let extra = op == 0xCA ? try fetch(&d, &pos, 2) : 0
            let n = d.rexW ? 8 : 4
            let target = try read(gpr[4], size: n)
            let sel = UInt16(truncatingIfNeeded: try read(gpr[4] &+ UInt64(n), size: n))
            try loadCodeSegment(sel)
            gpr[4] &+= UInt64(2 * n) &+ extra
            pos = target
        case 0xCC:
            rip = pos
            throw Fault.exception(vector: 3, errorCode: nil)  // delivered as a trap (RIP after)
        case 0xCD:
            let v = try fetch(&d, &pos, 1)
            rip = pos
            throw Fault.exception(vector: UInt8(v), errorCode: nil)
        case 0xCF:
            try iret()
            instructions &+= 1
            return .next
        case 0xE4, 0xE5, 0xEC, 0xED:  // IN
            let port = op <= 0xE5 ? UInt16(try fetch(&d, &pos, 1)) : UInt16(truncatingIfNeeded: gpr[2])
            let size = op & 1 == 0 ? 1 : (d.opsize16 ? 2 : 4)
            try checkIOPermission()
            pendingInSize = size
            rip = pos
            instructions &+= 1
            return .exit(.portIO(PortAccess(port: port, size: UInt8(size), direction: .read)))
        case 0xE6, 0xE7, 0xEE, 0xEF:  // OUT
            let port = op <= 0xE7 ? UInt16(try fetch(&d, &pos, 1)) : UInt16(truncatingIfNeeded: gpr[2])
            let size = op & 1 == 0 ? 1 : (d.opsize16 ? 2 : 4)
            try checkIOPermission()
            rip = pos
            instructions &+= 1
            return .exit(.portIO(PortAccess(port: port, size: UInt8(size), direction: .write,
                                            value: UInt32(truncatingIfNeeded: gpr[0] & Self.mask(size)))))
        case 0xE8:
            let rel = try fetchSigned(&d, &pos, 4)
            try push(pos)
            pos &+= rel
        case 0xE9: let rel = try fetchSigned(&d, &pos, 4); pos &+= rel
        case 0xEB: let rel = try fetchSigned(&d, &pos, 1); pos &+= rel
        case 0xF4:
            guard cpl == 0 else { throw Fault.gp() }
            rip = pos
            instructions &+= 1
            return .exit(.halt)
        case 0xF5: rflags ^= Flag.cf
        case 0xF6, 0xF7:
            try group3(op == 0xF6 ? 1 : d.size, &d, &pos)
        case 0xF8: rflags &= ~Flag.cf
        case 0xF9: rflags |= Flag.cf
        case 0xFA, 0xFB:
            guard cpl <= UInt8((rflags >> 12) & 3) else { throw Fault.gp() }
            if op == 0xFA { rflags &= ~Flag.if } else {
                if rflags & Flag.if == 0 { interruptShadow = true }
                rflags |= Flag.if
            }
        case 0xFC: rflags &= ~Flag.df
        case 0xFD: rflags |= Flag.df
        case 0xFE, 0xFF:
            try decodeModRM(&d, &pos)
            let size = op == 0xFE ? 1 : d.size
            switch d.reg & 7 {
            case 0, 1:
                let a = try readRM(d, pos, size)
                let cf = rflags & Flag.cf
                let r = alu(d.reg & 7 == 0 ? 0 : 5, a, 1, size)
                rflags = (rflags & ~Flag.cf) | cf
                try writeRM(d, pos, size, r)
            case 2 where op == 0xFF:  // CALL r/m
                let target = try readRM(d, pos, 8)
                try push(pos)
                pos = target
            case 4 where op == 0xFF:  // JMP r/m
                pos = try readRM(d, pos, 8)
            case 6 where op == 0xFF:  // PUSH r/m
                try push(try readRM(d, pos, 8))
            default:
                throw Fault.ud
            }
        case 0x0F:
            let op2 = Int(try fetch8(&d, &pos))
            return try executeTwoByte(op2, &d, &pos)
        default:
            throw Fault.ud
        }
        return finish(pos)
    }

    private func group3(_ size: Int, _ d: inout Decoded, _ pos: inout UInt64) throws(Fault) {
        try decodeModRM(&d, &pos)
        switch d.reg & 7 {
        case 0, 1:  // TEST r/m, imm
            let imm = try fetchSigned(&d, &pos, min(size, 4)) & Self.mask(size)
            _ = alu(4, try readRM(d, pos, size), imm, size)
        case 2: try writeRM(d, pos, size, ~(try readRM(d, pos, size)) & Self.mask(size))
        case 3:  // NEG
            let a = try readRM(d, pos, size)
            let r = alu(5, 0, a, size)
            try writeRM(d, pos, size, r)
        case 4, 5:  // MUL, IMUL (one operand)
            let b = try readRM(d, pos, size)
            let a = reg(0, size, d)
            let signed = d.reg & 7 == 5
            let bits = 8 * size
            var low: UInt64, high: UInt64
            if signed {
                let sa = Int64(bitPattern: a << UInt64(64 - bits)) >> Int64(64 - bits)
                let sb = Int64(bitPattern: b << UInt64(64 - bits)) >> Int64(64 - bits)
                let (h, l) = sa.multipliedFullWidth(by: sb)
                if size == 8 { low = l; high = UInt64(bitPattern: h) } else {
                    let p = UInt64(bitPattern: sa &* sb)
                    low = p & Self.mask(size); high = (p >> UInt64(bits)) & Self.mask(size)
                }
                let signExtended = Int64(bitPattern: low << UInt64(64 - bits)) >> Int64(64 - bits)
                let overflow = size == 8 ? (Int64(bitPattern: high) != (Int64(bitPattern: low) >> 63))
                                         : (signExtended != sa &* sb)
                rflags = (rflags & ~(Flag.cf | Flag.of)) | (overflow ? Flag.cf | Flag.of : 0)
            } else {
                let (h, l) = a.multipliedFullWidth(by: b)
                if size == 8 { low = l; high = h } else { low = l & Self.mask(size); high = (l >> UInt64(bits)) & Self.mask(size) }
                rflags = (rflags & ~(Flag.cf | Flag.of)) | (high != 0 ? Flag.cf | Flag.of : 0)
            }
            if size == 1 { setReg(0, 2, (high << 8) | low, d) } else { setReg(0, size, low, d); setReg(2, size, high, d) }
        default:  // DIV, IDIV
            let divisor = try readRM(d, pos, size)
            guard divisor != 0 else { throw Fault.de }
            let bits = UInt64(8 * size)
            let hi = size == 1 ? (gpr[0] >> 8) & 0xFF : reg(2, size, d)
            let lo = size == 1 ? gpr[0] & 0xFF : reg(0, size, d)
            var q: UInt64, r: UInt64
            if d.reg & 7 == 6 {
                guard hi < divisor else { throw Fault.de }
                if size == 8 { (q, r) = divisor.dividingFullWidth((hi, lo)) } else {
                    let n = (hi << bits) | lo
                    q = n / divisor; r = n % divisor
                }
            } else {
                let sd = Int64(bitPattern: divisor << (64 - bits)) >> Int64(64 - bits)
                if size == 8 {
                    let dividend = (high: Int64(bitPattern: hi), low: lo)
                    // dividingFullWidth traps on overflow; check the quotient fits first.
                    guard !(sd == -1 && dividend.high == Int64.min >> 63 && lo == UInt64(bitPattern: Int64.min)) else { throw Fault.de }
                    let negative = dividend.high < 0
                    let magnitude: (UInt64, UInt64) = negative
                        ? { let l = ~lo &+ 1; return (~UInt64(bitPattern: dividend.high) &+ (l == 0 ? 1 : 0), l) }()
                        : (hi, lo)
                    let dm = sd < 0 ? ~UInt64(bitPattern: sd) &+ 1 : UInt64(sd)  // |INT64_MIN| fits unsigned
                    guard magnitude.0 < dm else { throw Fault.de }
                    let (uq, ur) = dm.dividingFullWidth(magnitude)
                    let qNegative = negative != (sd < 0)
                    guard uq <= (qNegative ? UInt64(1) << 63 : UInt64(Int64.max)) else { throw Fault.de }
                    q = qNegative ? ~uq &+ 1 : uq
                    r = negative ? ~ur &+ 1 : ur
                } else {
                    let n = Int64(bitPattern: ((hi << bits) | lo) << (64 - 2 * bits)) >> Int64(64 - 2 * bits)
                    // INT64_MIN / -1 (edx:eax = 0x80000000:0 by -1) overflows: #DE, not a host trap.
                    let (sq, quotientOverflow) = n.dividedReportingOverflow(by: sd)
                    guard !quotientOverflow else { throw Fault.de }
                    let sr = n.remainderReportingOverflow(dividingBy: sd).partialValue
                    let limit = Int64(1) << Int64(bits - 1)
                    guard sq >= -limit && sq < limit else { throw Fault.de }
                    q = UInt64(bitPattern: sq) & Self.mask(size); r = UInt64(bitPattern: sr) & Self.mask(size)
                }
            }
            if size == 1 { setReg(0, 2, (r << 8) | (q & 0xFF), d) } else { setReg(0, size, q, d); setReg(2, size, r, d) }
        }
    }

    @inline(__always)
    func imul(_ a: UInt64, _ b: UInt64, _ size: Int) -> UInt64 {
        let bits = UInt64(8 * size)
        let sa = Int64(bitPattern: a << (64 - bits)) >> Int64(64 - bits)
        let sb = Int64(bitPattern: b << (64 - bits)) >> Int64(64 - bits)
        let (p, overflow64) = sa.multipliedReportingOverflow(by: sb)
        let r = UInt64(bitPattern: p) & Self.mask(size)
        let back = Int64(bitPattern: r << (64 - bits)) >> Int64(64 - bits)
        let overflow = size == 8 ? overflow64 : back != p
        rflags = (rflags & ~(Flag.cf | Flag.of)) | (overflow ? Flag.cf | Flag.of : 0)
        return r
    }

    /// Returns false when an MMIO write interrupted a repeated operation before RCX reached 0.
    private func stringOp(_ op: Int, _ d: inout Decoded) throws(Fault) -> Bool {
        let size = op & 1 == 0 ? 1 : d.size
        let step = rflags & Flag.df != 0 ? UInt64(bitPattern: -Int64(size)) : UInt64(size)
        let repeated = d.rep != 0
        while !repeated || gpr[1] != 0 {
            switch op {
            case 0xA4, 0xA5: try write(gpr[7], try read(gpr[6] &+ d.segmentBase, size: size), size: size); gpr[6] &+= step; gpr[7] &+= step
            case 0xAA, 0xAB: try write(gpr[7], reg(0, size, d), size: size); gpr[7] &+= step
            default: setReg(0, size, try read(gpr[6] &+ d.segmentBase, size: size), d); gpr[6] &+= step
            }
            if repeated { gpr[1] &-= 1 } else { break }
            if pendingMMIOWrite != nil { return gpr[1] == 0 }
        }
        return true
    }

    /// INS/OUTS: one element per exit. A REP form keeps RIP on the instruction until RCX
    /// reaches zero, so each element is an ordinary port exit (as interruptible REPs are).
    private func stringPortIO(_ op: Int, _ d: inout Decoded, _ pos: UInt64) throws(Fault) -> StepOutcome {
        try checkIOPermission()
        let size = op & 1 == 0 ? 1 : (d.opsize16 ? 2 : 4)
        let step = rflags & Flag.df != 0 ? UInt64(bitPattern: -Int64(size)) : UInt64(size)
        let port = UInt16(truncatingIfNeeded: gpr[2])
        if d.rep != 0 && gpr[1] == 0 { return finish(pos) }
        var exit: VMExit?
        if op >= 0x6E {  // OUTS
            let v = try read(gpr[6] &+ d.segmentBase, size: size)
            gpr[6] &+= step
            exit = .portIO(PortAccess(port: port, size: UInt8(size), direction: .write, value: UInt32(truncatingIfNeeded: v)))
        } else {  // INS: first ask for the value, then store it when re-executed
            guard let v = pendingInsValue else {
                awaitingInsValue = true
                return .exit(.portIO(PortAccess(port: port, size: UInt8(size), direction: .read)))
            }
            try write(gpr[7], v, size: size)
            pendingInsValue = nil
            gpr[7] &+= step
        }
        if d.rep != 0 { gpr[1] &-= 1 }
        let done = d.rep == 0 || gpr[1] == 0
        rip = done ? pos : d.start
        if done { instructions &+= 1 }
        return exit.map { .exit($0) } ?? .next
    }

    private func checkIOPermission() throws(Fault) {
        if cpl > UInt8((rflags >> 12) & 3) { throw Fault.gp() }
    }
}
