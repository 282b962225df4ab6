import VirtCore

extension CPU {
    func executeTwoByte(_ op: Int, _ d: inout Decoded, _ pos: inout UInt64) throws(Fault) -> StepOutcome {
        switch op {
        case 0x00:  // group 6: LTR (/3), others unsupported
            try decodeModRM(&d, &pos)
            guard d.reg & 7 == 3 else { throw Fault.ud }
            try requireCPL0()
            try loadTaskRegister(UInt16(truncatingIfNeeded: try readRM(d, pos, 2)))
        case 0x01:
            let modrm = try fetch8(&d, &pos)
            switch modrm {
            case 0xC1:  // VMCALL
                rip = pos
                instructions &+= 1
                return .exit(.hypercall(Hypercall(number: gpr[0], arg0: gpr[7], arg1: gpr[6], arg2: gpr[2], arg3: gpr[10])))
            case 0xF8:  // SWAPGS
                try requireCPL0()
                swap(&gs.base, &kernelGSBase)
            case 0xCA, 0xCB:  // CLAC, STAC
                try requireCPL0()
                if modrm == 0xCA { rflags &= ~Flag.ac } else { rflags |= Flag.ac }
            default:
                pos &-= 1
                try decodeModRM(&d, &pos)
                guard !d.isRegister else { throw Fault.ud }
                let a = effectiveAddress(d, pos)
                switch d.reg & 7 {
                case 0, 1:  // SGDT, SIDT
                    let t = d.reg & 7 == 0 ? gdt : idt
                    try write(a &+ 2, t.base, size: 8)
                    try write(a, UInt64(t.limit), size: 2)
                case 2, 3:  // LGDT, LIDT
                    try requireCPL0()
                    let limit = UInt16(try read(a, size: 2))
                    let base = try read(a &+ 2, size: 8)
                    if d.reg & 7 == 2 { gdt = DescriptorTableRegister(base: base, limit: limit) } else { idt = DescriptorTableRegister(base: base, limit: limit) }
                case 7:  // INVLPG (the whole TLB: simple, and rare in our guests)
                    try requireCPL0()
                    flushTLB()
                default:
                    throw Fault.ud
                }
            }
        case 0x05:  // SYSCALL
            guard efer & 1 != 0 else { throw Fault.ud }
            let star = msrs[MSR.star] ?? 0
            gpr[1] = pos
            gpr[11] = rflags & ~Flag.rf
            rflags &= ~((msrs[MSR.fmask] ?? 0) | Flag.rf)
            rflags |= 0x2
            let sel = UInt16(truncatingIfNeeded: star >> 32) & 0xFFFC
            cs = .code64(selector: sel)
            ss = .data(selector: sel &+ 8)
            pos = msrs[MSR.lstar] ?? 0
        case 0x07:  // SYSRET (64-bit)
            guard efer & 1 != 0 else { throw Fault.ud }
            try requireCPL0()
            let base = UInt16(truncatingIfNeeded: (msrs[MSR.star] ?? 0) >> 48)
            pos = gpr[1]
            rflags = (gpr[11] & ~Flag.rf) | 0x2
            cs = .code64(selector: (base &+ 16) | 3, dpl: 3)
            ss = .data(selector: (base &+ 8) | 3, dpl: 3)
        case 0x0B:
            throw Fault.ud
        case 0x1F:  // multi-byte NOP
            try decodeModRM(&d, &pos)
        case 0x20, 0x22:  // MOV r, CRn / MOV CRn, r
            try requireCPL0()
            try decodeModRM(&d, &pos)
            let n = d.reg
            if op == 0x20 {
                let v: UInt64
                switch n {
                case 0: v = cr0
                case 2: v = cr2
                case 3: v = cr3
                case 4: v = cr4
                case 8: v = cr8
                default: throw Fault.ud
                }
                gpr[d.rm] = v
            } else {
                let v = gpr[d.rm]
                switch n {
                case 0: cr0 = v | 0x10; flushTLB()
                case 2: cr2 = v
                case 3: cr3 = v; flushTLB()
                case 4: cr4 = v; flushTLB()
                case 8: cr8 = v & 0xF
                default: throw Fault.ud
                }
            }
        case 0x30:  // WRMSR
            try requireCPL0()
            try writeMSR(UInt32(truncatingIfNeeded: gpr[1]), (gpr[2] << 32) | (gpr[0] & 0xFFFF_FFFF))
        case 0x31:  // RDTSC: the retired-instruction count, deterministic across runs
            let tsc = instructions &+ tscOffset
            gpr[0] = tsc & 0xFFFF_FFFF
            gpr[2] = tsc >> 32
        case 0x32:  // RDMSR
            try requireCPL0()
            let v = try readMSR(UInt32(truncatingIfNeeded: gpr[1]))
            gpr[0] = v & 0xFFFF_FFFF
            gpr[2] = v >> 32
        case 0x40...0x4F:  // CMOVcc (the 32-bit form zero-extends even when false)
            try decodeModRM(&d, &pos)
            let v = try readRM(d, pos, d.size)
            setReg(d.reg, d.size, condition(op & 0xF) ? v : reg(d.reg, d.size, d), d)
        case 0x80...0x8F:
            let rel = try fetchSigned(&d, &pos, 4)
            if condition(op & 0xF) { pos &+= rel }
        case 0x90...0x9F:
            try decodeModRM(&d, &pos)
            try writeRM(d, pos, 1, condition(op & 0xF) ? 1 : 0)
        case 0xA2:
            cpuid()
        case 0xA3, 0xAB, 0xB3, 0xBB, 0xBA:  // BT, BTS, BTR, BTC (register or immediate bit)
            try decodeModRM(&d, &pos)
            let kind: Int  // 0 BT, 1 BTS, 2 BTR, 3 BTC
            switch op {
            case 0xBA: kind = (d.reg & 7) - 4
            case 0xA3: kind = 0
            case 0xAB: kind = 1
            case 0xB3: kind = 2
            default: kind = 3
            }
            guard kind >= 0 else { throw Fault.ud }
            let bits = UInt64(8 * d.size)
            var bit: UInt64
            var address = effectiveAddress(d, pos)
            if op == 0xBA {
                bit = try fetch(&d, &pos, 1) % bits
                address = effectiveAddress(d, pos)
            } else {
                let offset = Int64(bitPattern: reg(d.reg, d.size, d) << (64 - bits)) >> Int64(64 - bits)
                if d.isRegister { bit = UInt64(bitPattern: offset) % bits } else {
                    address = address &+ UInt64(bitPattern: (offset >> Int64(bits.trailingZeroBitCount)) * Int64(d.size))
                    bit = UInt64(bitPattern: offset) & (bits - 1)
                }
            }
            let v = d.isRegister ? reg(d.rm, d.size, d) : try read(address, size: d.size)
            rflags = (rflags & ~Flag.cf) | ((v >> bit) & 1 != 0 ? Flag.cf : 0)
            if kind != 0 {
                let r = kind == 1 ? v | (1 << bit) : kind == 2 ? v & ~(1 << bit) : v ^ (1 << bit)
                if d.isRegister { setReg(d.rm, d.size, r, d) } else { try write(address, r, size: d.size) }
            }
        case 0xA4, 0xA5, 0xAC, 0xAD:  // SHLD, SHRD (immediate or CL count)
            try decodeModRM(&d, &pos)
            let count = (op & 1 == 0 ? try fetch(&d, &pos, 1) : gpr[1]) & (d.size == 8 ? 63 : 31)
            let bits = UInt64(8 * d.size)
            let dst = try readRM(d, pos, d.size), src = reg(d.reg, d.size, d)
            var r = dst
            if count != 0 && count < bits {
                let left = op <= 0xA5
                r = left ? ((dst << count) | (src >> (bits - count))) & Self.mask(d.size)
                         : ((dst >> count) | (src << (bits - count))) & Self.mask(d.size)
                let cf = left ? (dst >> (bits - count)) & 1 != 0 : (dst >> (count - 1)) & 1 != 0
                let of = (r ^ dst) & Self.sign(d.size) != 0  // defined for count 1 only
                setResultFlags(r, d.size, carry: cf, overflow: of, aux: false)
            }
            // Written even for count 0: a 32-bit register destination is zero-extended.
            try writeRM(d, pos, d.size, r)
        case 0xAF:
            try decodeModRM(&d, &pos)
            setReg(d.reg, d.size, imul(reg(d.reg, d.size, d), try readRM(d, pos, d.size), d.size), d)
        case 0xB0, 0xB1:  // CMPXCHG
            let size = op == 0xB0 ? 1 : d.size
            try decodeModRM(&d, &pos)
            let current = try readRM(d, pos, size)
            _ = alu(7, reg(0, size, d), current, size)
            if rflags & Flag.zf != 0 { try writeRM(d, pos, size, reg(d.reg, size, d)) } else {
                try writeRM(d, pos, size, current)  // the destination is always written
                setReg(0, size, current, d)
            }
        case 0xB6, 0xB7, 0xBE, 0xBF:  // MOVZX, MOVSX
            try decodeModRM(&d, &pos)
            let from = op & 1 == 0 ? 1 : 2
            var v = try readRM(d, pos, from)
            if op >= 0xBE { v = UInt64(bitPattern: Int64(bitPattern: v << UInt64(64 - 8 * from)) >> Int64(64 - 8 * from)) }
            setReg(d.reg, d.size, v & Self.mask(d.size), d)
        case 0xB8 where d.rep == 0xF3:  // POPCNT
            try decodeModRM(&d, &pos)
            let v = try readRM(d, pos, d.size)
            setReg(d.reg, d.size, UInt64(v.nonzeroBitCount), d)
            rflags = (rflags & ~Flag.arithmetic) | (v == 0 ? Flag.zf : 0)
        case 0xBC, 0xBD:  // BSF/BSR, or TZCNT/LZCNT with F3
            try decodeModRM(&d, &pos)
            let v = try readRM(d, pos, d.size)
            let bits = 8 * d.size
            if d.rep == 0xF3 {
                let count = op == 0xBC ? min(v.trailingZeroBitCount, bits) : (v == 0 ? bits : v.leadingZeroBitCount - (64 - bits))
                setReg(d.reg, d.size, UInt64(count), d)
                rflags = (rflags & ~(Flag.cf | Flag.zf)) | (v == 0 ? Flag.cf : 0) | (count == 0 ? Flag.zf : 0)
            } else if v == 0 {
                rflags |= Flag.zf  // destination unchanged
            } else {
                setReg(d.reg, d.size, UInt64(op == 0xBC ? v.trailingZeroBitCount : 63 - v.leadingZeroBitCount), d)
                rflags &= ~Flag.zf
            }
        case 0xC0, 0xC1:  // XADD
            let size = op == 0xC0 ? 1 : d.size
            try decodeModRM(&d, &pos)
            let a = try readRM(d, pos, size)
            let r = alu(0, a, reg(d.reg, size, d), size)
            try writeRM(d, pos, size, r)
            setReg(d.reg, size, a, d)
        case 0xC8...0xCF:  // BSWAP
            let n = (op & 7) | (d.rex & 1 != 0 ? 8 : 0)
            if d.rexW { gpr[n] = gpr[n].byteSwapped } else { gpr[n] = UInt64(UInt32(truncatingIfNeeded: gpr[n]).byteSwapped) }
        default:
            throw Fault.ud
        }
        return finish(pos)
    }

    func requireCPL0() throws(Fault) { if cpl != 0 { throw Fault.gp() } }

    /// CPUID leaves: vendor "SwiftvisorSW", family 6, long mode, NX, SYSCALL, POPCNT,
    /// LZCNT; no SSE/x87 features are claimed beyond what the interpreter does.
    func cpuid() {
        let leaf = UInt32(truncatingIfNeeded: gpr[0])
        var a: UInt32 = 0, b: UInt32 = 0, c: UInt32 = 0, dd: UInt32 = 0
        switch leaf {
        case 0:
            a = 1
            b = 0x6674_6977  // "Swif"
            dd = 0x6F73_6976  // "tvis"
            c = 0x5753_726F  // "orSW"
        case 1:
            a = 0x0000_0600
            c = 1 << 23        // POPCNT
            dd = (1 << 4) | (1 << 5) | (1 << 6) | (1 << 8) | (1 << 15)  // TSC MSR PAE CX8 CMOV
        case 0x8000_0000:
            a = 0x8000_0001
        case 0x8000_0001:
            c = (1 << 0) | (1 << 5)                     // LAHF in 64-bit mode, LZCNT
            dd = (1 << 11) | (1 << 20) | (1 << 29)      // SYSCALL, NX, long mode
        default:
            break
        }
        gpr[0] = UInt64(a); gpr[3] = UInt64(b); gpr[1] = UInt64(c); gpr[2] = UInt64(dd)
    }

    func readMSR(_ index: UInt32) throws(Fault) -> UInt64 {
        switch index {
        case MSR.efer: return efer
        case MSR.fsBase: return fs.base
        case MSR.gsBase: return gs.base
        case MSR.kernelGSBase: return kernelGSBase
        case MSR.tsc: return instructions &+ tscOffset
        case MSR.apicBase: return apicBase
        case MSR.star, MSR.lstar, MSR.cstar, MSR.fmask, MSR.pat, MSR.sysenterCS, MSR.sysenterESP, MSR.sysenterEIP:
            return msrs[index] ?? 0
        default: throw Fault.gp()
        }
    }

    func writeMSR(_ index: UInt32, _ v: UInt64) throws(Fault) {
        switch index {
        case MSR.efer: efer = (v & 0xD01) | (efer & 0x400)  // LMA is read-only
        case MSR.fsBase: fs.base = v
        case MSR.gsBase: gs.base = v
        case MSR.kernelGSBase: kernelGSBase = v
        case MSR.tsc: tscOffset = v &- instructions
        case MSR.apicBase: apicBase = v
        case MSR.star, MSR.lstar, MSR.cstar, MSR.fmask, MSR.pat, MSR.sysenterCS, MSR.sysenterESP, MSR.sysenterEIP:
            msrs[index] = v
        default: throw Fault.gp()
        }
    }
}
