import VirtCore

/// Real mode, 16/32-bit protected mode and compatibility mode: the short stretch between a
/// multiboot entry (or an SMP trampoline at a SIPI vector) and the far transfer into 64-bit
/// code. Such code runs only while a CPU boots, so it is decoded from its bytes at every
/// step (no decoded-instruction cache, never translated) and kept apart from the 64-bit
/// decoder. Instructions whose effect does not depend on the mode beyond operand size are
/// handed to the 64-bit executor with their memory operand resolved to a linear address;
/// the rest (stack, branches, far transfers, segment and descriptor-table loads) are
/// implemented here. Unimplemented encodings raise #UD.
extension CPU {
    /// Whether the CPU runs outside 64-bit mode.
    @inline(__always)
    var inLegacyMode: Bool { !cs.l }

    /// Runs up to `limit` instructions outside 64-bit mode; stops early when an instruction
    /// sets `attention` or the CPU reaches 64-bit mode. Returns the attempts made.
    func runLegacy(_ limit: Int) -> Int {
        var used = 0
        while used < limit {
            used += 1
            do throws(Fault) {
                try stepLegacy()
            } catch {
                handle(error)
            }
            if attention || !inLegacyMode { break }
        }
        return used
    }

    /// The decoder's view of one instruction outside 64-bit mode.
    private struct LegacyOperands {
        var length = 0
        var opsize = 4, asize = 4
        var segment = -1  // override: 0 ES, 1 CS, 2 SS, 3 DS, 4 FS, 5 GS
        /// Memory operand: offset within its segment and linear address.
        var offset: UInt64 = 0, linear: UInt64 = 0
    }

    private func legacyByte(_ k: Int) throws(Fault) -> UInt8 {
        guard k < 15 else { throw Fault.gp() }
        let mask: UInt64 = cs.db ? 0xFFFF_FFFF : 0xFFFF
        return UInt8(try read(cs.base &+ ((rip &+ UInt64(k)) & mask), size: 1, user: cpl == 3))
    }

    private func legacyImmediate(_ n: inout Int, _ count: Int, signed: Bool) throws(Fault) -> UInt64 {
        var v: UInt64 = 0
        for k in 0..<count { v |= UInt64(try legacyByte(n + k)) << (8 * UInt64(k)) }
        n += count
        return signed ? Self.signExtend(v, count) : v
    }

    private func segmentBase(_ n: Int) -> UInt64 {
        switch n {
        case 0: return es.base
        case 1: return cs.base
        case 2: return ss.base
        case 4: return fs.base
        case 5: return gs.base
        default: return ds.base
        }
    }

    private static func legacyHasModRM(_ op: Int) -> Bool {
        switch op {
        case 0x00...0x3F: return op & 7 <= 3
        case 0x62, 0x63, 0x69, 0x6B, 0x80...0x8F, 0xC0, 0xC1, 0xC4...0xC7, 0xD0...0xD3, 0xF6, 0xF7, 0xFE, 0xFF: return true
        case 0x100, 0x101, 0x11F, 0x120, 0x122, 0x140...0x14F, 0x190...0x19F, 0x1A3, 0x1AB, 0x1AF, 0x1B0, 0x1B1, 0x1B3,
             0x1B6, 0x1B7, 0x1BA, 0x1BB...0x1BF, 0x1C0, 0x1C1, 0x1C7:
            return true
        default: return false
        }
    }

    /// Decodes ModRM (and SIB, displacement) with 16- or 32-bit addressing.
    private func legacyModRM(_ i: inout Instr, _ o: inout LegacyOperands, _ n: inout Int) throws(Fault) {
        let m = try legacyByte(n); n += 1
        i.modrm = m
        let mod = m >> 6, rmLow = m & 7
        i.reg = (m >> 3) & 7
        i.rm = rmLow
        if mod == 3 || i.op == 0x120 || i.op == 0x122 { return }
        i.pfx |= Instr.P.mem
        var offset: UInt64 = 0
        var stackBased = false
        if o.asize == 2 {
            switch rmLow {
            case 0: offset = gpr[3] &+ gpr[6]
            case 1: offset = gpr[3] &+ gpr[7]
            case 2: offset = gpr[5] &+ gpr[6]; stackBased = true
            case 3: offset = gpr[5] &+ gpr[7]; stackBased = true
            case 4: offset = gpr[6]
            case 5: offset = gpr[7]
            case 6:
                if mod == 0 { offset = try legacyImmediate(&n, 2, signed: false) } else { offset = gpr[5]; stackBased = true }
            default: offset = gpr[3]
            }
            if mod == 1 { offset &+= try legacyImmediate(&n, 1, signed: true) }
            if mod == 2 { offset &+= try legacyImmediate(&n, 2, signed: true) }
            offset &= 0xFFFF
        } else {
            if rmLow == 4 {
                let sib = try legacyByte(n); n += 1
                let index = Int((sib >> 3) & 7), base = Int(sib & 7)
                if index != 4 { offset = gpr[index] &<< UInt64(sib >> 6) }
                if base == 5 && mod == 0 {
                    offset &+= try legacyImmediate(&n, 4, signed: true)
                } else {
                    offset &+= gpr[base]
                    stackBased = base == 4 || base == 5
                }
            } else if rmLow == 5 && mod == 0 {
                offset = try legacyImmediate(&n, 4, signed: true)
            } else {
                offset = gpr[Int(rmLow)]
                stackBased = rmLow == 5
            }
            if mod == 1 { offset &+= try legacyImmediate(&n, 1, signed: true) }
            if mod == 2 { offset &+= try legacyImmediate(&n, 4, signed: true) }
            offset &= 0xFFFF_FFFF
        }
        o.offset = offset
        let segment = o.segment >= 0 ? o.segment : (stackBased ? 2 : 3)
        o.linear = (segmentBase(segment) &+ offset) & 0xFFFF_FFFF
        i.disp = o.linear
    }

    private func stackMask() -> UInt64 { ss.db ? 0xFFFF_FFFF : 0xFFFF }

    private func legacyPush(_ value: UInt64, size: Int) throws(Fault) {
        let m = stackMask()
        let sp = (gpr[4] &- UInt64(size)) & m
        try write(ss.base &+ sp, value, size: size)
        gpr[4] = (gpr[4] & ~m) | sp
    }

    private func legacyPop(size: Int) throws(Fault) -> UInt64 {
        let m = stackMask()
        let sp = gpr[4] & m
        let v = try read(ss.base &+ sp, size: size)
        gpr[4] = (gpr[4] & ~m) | ((sp &+ UInt64(size)) & m)
        return v
    }

    /// Loads CS for a far transfer outside 64-bit mode: in real mode the selector is the
    /// paragraph; otherwise a code segment from the GDT (16/32-bit, or 64-bit once long
    /// mode is active), at the current privilege level.
    private func legacyLoadCS(_ selector: UInt16) throws(Fault) {
        if cr0 & CR.pe == 0 {
            cs.selector = selector
            cs.base = UInt64(selector) << 4
            return
        }
        let code = UInt32(selector & 0xFFFC)
        guard selector & 0xFFFC != 0 else { throw Fault.gp() }
        var seg = Self.segment(selector, try descriptor(selector))
        guard seg.s, seg.type & 8 != 0 else { throw Fault.gp(code) }
        guard !seg.l || efer & CR.eferLMA != 0, !(seg.l && seg.db) else { throw Fault.gp(code) }
        guard seg.present else { throw Fault.exception(vector: 11, errorCode: code) }
        seg.dpl = cpl
        seg.selector = (selector & 0xFFFC) | UInt16(cpl)
        cs = seg
        attention = true  // the run loop re-checks the mode
    }

    private func legacyLoadSegment(_ n: Int, _ selector: UInt16) throws(Fault) {
        if cr0 & CR.pe == 0 {
            var seg = SegmentRegister(selector: selector, base: UInt64(selector) << 4, limit: 0xFFFF, type: 3, present: true, s: true)
            seg.db = false
            switch n {
            case 0: es = seg
            case 2: ss = seg
            case 3: ds = seg
            case 4: fs = seg
            case 5: gs = seg
            default: throw Fault.ud
            }
            return
        }
        try loadSegment(n, selector)
    }

    private func stepLegacy() throws(Fault) {
        let codeSize = cs.db ? 4 : 2
        var o = LegacyOperands()
        o.opsize = codeSize
        o.asize = codeSize
        var i = Instr()
        var n = 0
        var b: Int
        prefixes: while true {
            b = Int(try legacyByte(n)); n += 1
            switch b {
            case 0x66: o.opsize = 6 - codeSize
            case 0x67: o.asize = 6 - codeSize
            case 0xF0: i.pfx |= Instr.P.lock
            case 0xF2, 0xF3: i.rep = UInt8(b)
            case 0x26: o.segment = 0
            case 0x2E: o.segment = 1
            case 0x36: o.segment = 2
            case 0x3E: o.segment = 3
            case 0x64: o.segment = 4
            case 0x65: o.segment = 5
            default: break prefixes
            }
        }
        var op = b
        if b == 0x0F { op = 0x100 | Int(try legacyByte(n)); n += 1 }
        i.op = UInt16(op)
        i.osize = UInt8(o.opsize)
        if o.opsize == 2 { i.pfx |= Instr.P.opsize }
        i.reg = UInt8(op & 7)
        if Self.legacyHasModRM(op) { try legacyModRM(&i, &o, &n) }
        // Immediates.
        let z = o.opsize == 2 ? 2 : 4
        switch op {
        case 0x04, 0x0C, 0x14, 0x1C, 0x24, 0x2C, 0x34, 0x3C, 0x6A, 0x6B, 0x70...0x7F, 0x80, 0x83, 0xA8, 0xB0...0xB7,
             0xC0, 0xC1, 0xC6, 0xD4, 0xD5, 0xE0...0xE7, 0xEB, 0x1BA:
            i.imm = try legacyImmediate(&n, 1, signed: true)
        case 0x05, 0x0D, 0x15, 0x1D, 0x25, 0x2D, 0x35, 0x3D, 0x68, 0x69, 0x81, 0xA9, 0xB8...0xBF, 0xC7, 0xE8, 0xE9, 0x180...0x18F:
            i.imm = try legacyImmediate(&n, z, signed: true)
        case 0xC2, 0xCA:
            i.imm = try legacyImmediate(&n, 2, signed: false)
        case 0xA0...0xA3:
            i.imm = try legacyImmediate(&n, o.asize, signed: false)
        case 0xF6, 0xF7:
            if i.ext < 2 { i.imm = try legacyImmediate(&n, op == 0xF6 ? 1 : z, signed: true) }
        case 0xEA:
            i.imm = try legacyImmediate(&n, z, signed: false)
            i.imm2 = UInt16(try legacyImmediate(&n, 2, signed: false))
        default: break
        }
        i.length = UInt8(n)
        let ipMask: UInt64 = codeSize == 4 ? 0xFFFF_FFFF : 0xFFFF
        let next = (rip &+ UInt64(n)) & ipMask
        let branchMask: UInt64 = o.opsize == 4 ? 0xFFFF_FFFF : 0xFFFF
        switch op {
        case 0x40...0x4F:  // INC/DEC r (CF unchanged)
            let r = op & 7
            let cf = rflags & Flag.cf
            setReg(r, o.opsize, alu(op < 0x48 ? 0 : 5, reg(r, o.opsize, false), 1, o.opsize), false)
            rflags = (rflags & ~Flag.cf) | cf
            commit(next)
        case 0x50...0x57:
            try legacyPush(reg(op & 7, o.opsize, false), size: o.opsize)
            commit(next)
        case 0x58...0x5F:
            let v = try legacyPop(size: o.opsize)
            setReg(op & 7, o.opsize, v, false)
            commit(next)
        case 0x68, 0x6A:
            try legacyPush(i.imm & Self.mask(o.opsize), size: o.opsize)
            commit(next)
        case 0x70...0x7F, 0x180...0x18F:
            commit(condition(op & 0xF) ? (next &+ i.imm) & branchMask : next)
        case 0x8D:
            guard i.isMem else { throw Fault.ud }
            setReg(Int(i.reg), o.opsize, o.offset, false)
            commit(next)
        case 0x8E:
            let sreg = i.ext
            guard sreg != 1 && sreg <= 5 else { throw Fault.ud }
            let v = i.isMem ? try read(o.linear, size: 2) : gpr[Int(i.rm)]
            try legacyLoadSegment(sreg, UInt16(truncatingIfNeeded: v))
            commit(next)
            if sreg == 2 { interruptShadow = true; attention = true }
        case 0x8F:
            guard i.ext == 0 else { throw Fault.ud }
            let v = try legacyPop(size: o.opsize)
            try writeRM(i, o.opsize, v)
            commit(next)
        case 0x9C:
            try legacyPush(rflags & ~(Flag.rf | Flag.vm) & Self.mask(o.opsize), size: o.opsize)
            commit(next)
        case 0x9D:
            let v = try legacyPop(size: o.opsize)
            var changeable: UInt64 = Flag.arithmetic | Flag.tf | Flag.df | Flag.nt | Flag.ac | Flag.id | Flag.iopl | Flag.if
            if o.opsize == 2 { changeable &= 0xFFFF }
            let wasIF = rflags & Flag.if
            rflags = (rflags & ~changeable) | (v & changeable) | 0x2
            if wasIF == 0 && rflags & Flag.if != 0 { attention = true }
            commit(next)
        case 0xA0...0xA3:
            let size = op & 1 == 0 ? 1 : o.opsize
            let linear = (segmentBase(o.segment >= 0 ? o.segment : 3) &+ i.imm) & 0xFFFF_FFFF
            if op <= 0xA1 { setReg(0, size, try read(linear, size: size), false) } else { try write(linear, reg(0, size, false), size: size) }
            commit(next)
        case 0xC2, 0xC3:
            let target = try legacyPop(size: o.opsize)
            let m = stackMask()
            if op == 0xC2 { gpr[4] = (gpr[4] & ~m) | ((gpr[4] &+ i.imm) & m) }
            commit(target & branchMask)
        case 0xCA, 0xCB:  // far return (same privilege)
            let target = try legacyPop(size: o.opsize)
            let selector = UInt16(truncatingIfNeeded: try legacyPop(size: o.opsize))
            try legacyLoadCS(selector)
            if op == 0xCA { let m = stackMask(); gpr[4] = (gpr[4] & ~m) | ((gpr[4] &+ i.imm) & m) }
            commit(cs.l ? target : target & branchMask)
        case 0xE8:
            try legacyPush(next, size: o.opsize)
            commit((next &+ i.imm) & branchMask)
        case 0xE9, 0xEB:
            commit((next &+ i.imm) & branchMask)
        case 0xEA:
            try legacyLoadCS(i.imm2)
            commit(i.imm)
        case 0xFF where i.ext == 2:
            let target = try readRM(i, o.opsize)
            try legacyPush(next, size: o.opsize)
            commit(target & branchMask)
        case 0xFF where i.ext == 4:
            commit(try readRM(i, o.opsize) & branchMask)
        case 0xFF where i.ext == 5:
            guard i.isMem else { throw Fault.ud }
            let target = try read(o.linear, size: o.opsize)
            let selector = UInt16(truncatingIfNeeded: try read(o.linear &+ UInt64(o.opsize), size: 2))
            try legacyLoadCS(selector)
            commit(target)
        case 0xFF where i.ext == 6:
            try legacyPush(try readRM(i, o.opsize), size: o.opsize)
            commit(next)
        case 0x101 where i.isMem && (i.ext == 2 || i.ext == 3):  // LGDT, LIDT
            try requireCPL0()
            let limit = UInt16(try read(o.linear, size: 2))
            var base = try read(o.linear &+ 2, size: 4)
            if o.opsize == 2 { base &= 0xFF_FFFF }
            let table = DescriptorTableRegister(base: base, limit: limit)
            if i.ext == 2 { gdt = table } else { idt = table }
            commit(next)
        case 0x06, 0x07, 0x0E, 0x16, 0x17, 0x1E, 0x1F, 0x27, 0x2F, 0x37, 0x3F, 0x60...0x67, 0x6C...0x6F, 0xA4...0xA7,
             0xAA...0xAF, 0xC4, 0xC5, 0xC8, 0xC9, 0xCC...0xCF, 0xD4...0xD7, 0xE0...0xE3, 0x105, 0x107, 0x1A0, 0x1A1, 0x1A8, 0x1A9:
            throw Fault.ud  // not needed by boot code; not implemented outside 64-bit mode
        default:
            if op < 0x100 && op >= 0xD8 && op <= 0xDF { throw Fault.ud }
            if let lock = atomicLock, i.pfx & Instr.P.lock != 0 || (op & 0x1FE == 0x86 && i.isMem) {
                try executeLocked(i, lock)
            } else {
                try execute(i)
            }
            rip &= ipMask
        }
    }
}
