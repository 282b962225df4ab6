import VirtCore

extension CPU {
    /// The 0F opcode map.
    func executeTwoByte(_ i: Instr, _ next: inout UInt64) throws(Fault) {
        let op = Int(i.op) & 0xFF
        let rex = i.hasREX
        switch op {
        case 0x00:  // group 6
            switch i.ext {
            case 0, 1:  // SLDT, STR
                if cr4 & CR.umip != 0 { try requireCPL0() }
                let sel = UInt64(i.ext == 0 ? ldtr.selector : tr.selector)
                try writeRM(i, i.isMem ? 2 : i.size, sel)
            case 2:  // LLDT
                try requireCPL0()
                try loadLDT(UInt16(truncatingIfNeeded: try readRM(i, 2)))
            case 3:  // LTR
                try requireCPL0()
                try loadTaskRegister(UInt16(truncatingIfNeeded: try readRM(i, 2)))
            case 4, 5:  // VERR, VERW (Linux's MDS mitigation runs VERW on every return to user mode)
                guard cr0 & CR.pe != 0 else { throw Fault.ud }
                let selector = UInt16(truncatingIfNeeded: try readRM(i, 2))
                let accessible = try segmentAccessible(selector, write: i.ext == 5)
                rflags = accessible ? rflags | Flag.zf : rflags & ~Flag.zf
            default:
                throw Fault.ud
            }
        case 0x01:
            try group7(i, &next)
        case 0x05:  // SYSCALL
            guard efer & CR.eferSCE != 0 else { throw Fault.ud }
            gpr[1] = next
            gpr[11] = rflags & ~Flag.rf
            rflags &= ~(fmask | Flag.rf)
            rflags |= 0x2
            let sel = UInt16(truncatingIfNeeded: star >> 32) & 0xFFFC
            cs = .code64(selector: sel)
            ss = .data(selector: sel &+ 8)
            next = lstar
            attention = true
        case 0x06:  // CLTS
            try requireCPL0()
            cr0 &= ~CR.ts
        case 0x07:  // SYSRET (64-bit with REX.W; the 32-bit form is not supported)
            guard efer & CR.eferSCE != 0 else { throw Fault.ud }
            try requireCPL0()
            guard i.rexW else { throw Fault.ud }
            guard Self.isCanonical(gpr[1]) else { throw Fault.gp() }
            let base = UInt16(truncatingIfNeeded: star >> 48)
            next = gpr[1]
            rflags = (gpr[11] & 0x3C_7FD7) | 0x2
            cs = .code64(selector: (base &+ 16) | 3, dpl: 3)
            ss = .data(selector: (base &+ 8) | 3, dpl: 3)
            attention = true
        case 0x08, 0x09:  // INVD, WBINVD: no caches to manage
            try requireCPL0()
        case 0x0B:
            throw Fault.ud
        case 0x0D, 0x18...0x1F:  // prefetch hints, multi-byte NOP, ENDBR64
            break
        case 0x20:  // MOV r64, CRn
            try requireCPL0()
            let v: UInt64
            switch i.reg {
            case 0: v = cr0
            case 2: v = cr2
            case 3: v = cr3
            case 4: v = cr4
            case 8: v = interruptController.map { UInt64($0.taskPriorityClass(vcpu: vcpuIndex)) } ?? cr8
            default: throw Fault.ud
            }
            gpr[Int(i.rm)] = v
        case 0x22:  // MOV CRn, r64
            try requireCPL0()
            try writeCR(Int(i.reg), gpr[Int(i.rm)])
        case 0x21:  // MOV r64, DRn
            try requireCPL0()
            gpr[Int(i.rm)] = try readDR(Int(i.reg))
        case 0x23:  // MOV DRn, r64
            try requireCPL0()
            try writeDR(Int(i.reg), gpr[Int(i.rm)])
        case 0x30:  // WRMSR
            try requireCPL0()
            try writeMSR(UInt32(truncatingIfNeeded: gpr[1]), (gpr[2] << 32) | (gpr[0] & 0xFFFF_FFFF))
        case 0x31:  // RDTSC: the retired-instruction count, deterministic across runs
            if cr4 & CR.tsd != 0 { try requireCPL0() }
            let tsc = instructions &+ tscOffset
            gpr[0] = tsc & 0xFFFF_FFFF
            gpr[2] = tsc >> 32
        case 0x32:  // RDMSR
            try requireCPL0()
            let v = try readMSR(UInt32(truncatingIfNeeded: gpr[1]))
            gpr[0] = v & 0xFFFF_FFFF
            gpr[2] = v >> 32
        case 0x40...0x4F:  // CMOVcc (the 32-bit form zero-extends even when false)
            let v = try readRM(i, i.size)
            setReg(Int(i.reg), i.size, condition(op & 0xF) ? v : reg(Int(i.reg), i.size, rex), rex)
        case 0x80...0x8F:
            if condition(op & 0xF) { next = try branch(next &+ i.imm) }
        case 0x90...0x9F:
            try writeRM(i, 1, condition(op & 0xF) ? 1 : 0)
        case 0xA0, 0xA8:  // PUSH FS/GS
            let sel = UInt64(op == 0xA0 ? fs.selector : gs.selector)
            if i.opsize16 { try push(sel, size: 2) } else { try push(sel) }
        case 0xA1, 0xA9:  // POP FS/GS
            let size = i.opsize16 ? 2 : 8
            let v = try read(gpr[4], size: size)
            try loadSegment(op == 0xA1 ? 4 : 5, UInt16(truncatingIfNeeded: v))
            gpr[4] &+= UInt64(size)
        case 0xA2:
            cpuid()
        case 0xA3, 0xAB, 0xB3, 0xBB, 0xBA:  // BT, BTS, BTR, BTC (register or immediate bit)
            try bitTest(i, op)
        case 0xA4, 0xA5, 0xAC, 0xAD:  // SHLD, SHRD (immediate or CL count)
            let count = (op & 1 == 0 ? i.imm : gpr[1]) & (i.size == 8 ? 63 : 31)
            let bits = UInt64(8 * i.size)
            let a: UInt64 = i.isMem ? ea(i) : 0
            let dst = i.isMem ? try read(a, size: i.size) : reg(Int(i.rm), i.size, rex)
            let src = reg(Int(i.reg), i.size, rex)
            if count == 0 {
                // Nothing changes, but a 32-bit register destination is still zero-extended.
                if !i.isMem { setReg(Int(i.rm), i.size, dst, rex) }
                break
            }
            let saved = rflags
            var r = dst
            let left = op <= 0xA5
            if count < bits {
                r = left ? ((dst << count) | (src >> (bits - count))) & Self.mask(i.size)
                         : ((dst >> count) | (src << (bits - count))) & Self.mask(i.size)
                let cf = left ? (dst >> (bits - count)) & 1 != 0 : (dst >> (count - 1)) & 1 != 0
                let of = (r ^ dst) & Self.sign(i.size) != 0  // defined for count 1 only
                setResultFlags(r, i.size, carry: cf, overflow: of, aux: false)
            } else {
                // 16-bit operand with a count of 16…31: the result is undefined; keep the destination.
                r = dst
            }
            if i.isMem { try writeBack(a, r, i.size, flags: saved) } else { setReg(Int(i.rm), i.size, r, rex) }
        case 0xAE:  // group 15
            if !i.isMem {
                if i.rep == 0xF3 && i.ext <= 3 {  // RDFSBASE RDGSBASE WRFSBASE WRGSBASE
                    guard cr4 & CR.fsgsbase != 0 else { throw Fault.ud }
                    let size = i.rexW ? 8 : 4
                    switch i.ext {
                    case 0: setReg(Int(i.rm), size, fs.base & Self.mask(size), rex)
                    case 1: setReg(Int(i.rm), size, gs.base & Self.mask(size), rex)
                    default:
                        let v = reg(Int(i.rm), size, rex)
                        guard Self.isCanonical(v) else { throw Fault.gp() }
                        if i.ext == 2 { fs.base = v } else { gs.base = v }
                    }
                } else if i.ext >= 5 && i.rep == 0 {
                    break  // LFENCE, MFENCE, SFENCE
                } else {
                    throw Fault.ud
                }
            } else if i.ext == 7 && i.rep == 0 && !i.opsize16 {
                _ = try read(ea(i), size: 1)  // CLFLUSH: faults like a byte load, nothing to flush
            } else {
                try executeStateSave(i)  // FXSAVE/FXRSTOR/LDMXCSR/STMXCSR/XSAVE…
            }
        case 0xAF:
            setReg(Int(i.reg), i.size, imul(reg(Int(i.reg), i.size, rex), try readRM(i, i.size), i.size), rex)
        case 0xB0, 0xB1:  // CMPXCHG
            let size = op == 0xB0 ? 1 : i.size
            if i.isMem {
                let a = ea(i)
                let current = try read(a, size: size)
                let saved = rflags
                _ = alu(7, reg(0, size, rex), current, size)
                // The destination is always written (with its own value on failure).
                let success = rflags & Flag.zf != 0
                try writeBack(a, success ? reg(Int(i.reg), size, rex) : current, size, flags: saved)
                if !success { setReg(0, size, current, rex) }
            } else {
                let current = reg(Int(i.rm), size, rex)
                _ = alu(7, reg(0, size, rex), current, size)
                if rflags & Flag.zf != 0 { setReg(Int(i.rm), size, reg(Int(i.reg), size, rex), rex) } else {
                    setReg(0, size, current, rex)
                }
            }
        case 0xB6, 0xB7, 0xBE, 0xBF:  // MOVZX, MOVSX
            let from = op & 1 == 0 ? 1 : 2
            var v = try readRM(i, from)
            if op >= 0xBE { v = Self.signExtend(v, from) }
            setReg(Int(i.reg), i.size, v & Self.mask(i.size), rex)
        case 0xB8:  // POPCNT (F3 checked by the decoder)
            let v = try readRM(i, i.size)
            setReg(Int(i.reg), i.size, UInt64(v.nonzeroBitCount), rex)
            rflags = (rflags & ~Flag.arithmetic) | (v == 0 ? Flag.zf : 0)
        case 0xBC, 0xBD:  // BSF/BSR, or TZCNT/LZCNT with F3
            let v = try readRM(i, i.size)
            let bits = 8 * i.size
            if i.rep == 0xF3 {
                let count = op == 0xBC ? min(v.trailingZeroBitCount, bits) : (v == 0 ? bits : v.leadingZeroBitCount - (64 - bits))
                setReg(Int(i.reg), i.size, UInt64(count), rex)
                rflags = (rflags & ~(Flag.cf | Flag.zf)) | (v == 0 ? Flag.cf : 0) | (count == 0 ? Flag.zf : 0)
            } else if v == 0 {
                rflags |= Flag.zf  // destination unchanged
            } else {
                setReg(Int(i.reg), i.size, UInt64(op == 0xBC ? v.trailingZeroBitCount : 63 - v.leadingZeroBitCount), rex)
                rflags &= ~Flag.zf
            }
        case 0xC0, 0xC1:  // XADD
            let size = op == 0xC0 ? 1 : i.size
            let src = reg(Int(i.reg), size, rex)
            if i.isMem {
                let a = ea(i)
                let old = try read(a, size: size)
                let saved = rflags
                let r = alu(0, old, src, size)
                try writeBack(a, r, size, flags: saved)
                setReg(Int(i.reg), size, old, rex)
            } else {
                let old = reg(Int(i.rm), size, rex)
                let r = alu(0, old, src, size)
                setReg(Int(i.reg), size, old, rex)
                setReg(Int(i.rm), size, r, rex)
            }
        case 0xC7:  // group 9: CMPXCHG8B / CMPXCHG16B
            guard i.ext == 1, i.isMem else { throw Fault.ud }
            let a = ea(i)
            if i.rexW {
                guard a & 15 == 0 else { throw Fault.gp() }
                let lo = try read(a, size: 8), hi = try read(a &+ 8, size: 8)
                if lo == gpr[0] && hi == gpr[2] {
                    try write(a, gpr[3], size: 8)
                    try write(a &+ 8, gpr[1], size: 8)
                    rflags |= Flag.zf
                } else {
                    try write(a, lo, size: 8)
                    try write(a &+ 8, hi, size: 8)
                    gpr[0] = lo; gpr[2] = hi
                    rflags &= ~Flag.zf
                }
            } else {
                let v = try read(a, size: 8)
                let expected = (gpr[2] & 0xFFFF_FFFF) << 32 | (gpr[0] & 0xFFFF_FFFF)
                if v == expected {
                    try write(a, (gpr[1] & 0xFFFF_FFFF) << 32 | (gpr[3] & 0xFFFF_FFFF), size: 8)
                    rflags |= Flag.zf
                } else {
                    try write(a, v, size: 8)
                    gpr[0] = v & 0xFFFF_FFFF; gpr[2] = v >> 32
                    rflags &= ~Flag.zf
                }
            }
        case 0xC8...0xCF:  // BSWAP (the 16-bit form clears the word, like current CPUs)
            let n = Int(i.reg)
            switch i.size {
            case 8: gpr[n] = gpr[n].byteSwapped
            case 4: gpr[n] = UInt64(UInt32(truncatingIfNeeded: gpr[n]).byteSwapped)
            default: gpr[n] &= ~0xFFFF
            }
        case 0x77:  // EMMS
            try emms()
        case let sse where Self.isSSEOpcode(sse) || sse == 0xC3:
            try executeSSE(i)
        default:
            throw Fault.ud
        }
    }

    private func bitTest(_ i: Instr, _ op: Int) throws(Fault) {
        let kind: Int  // 0 BT, 1 BTS, 2 BTR, 3 BTC
        switch op {
        case 0xBA:
            kind = i.ext - 4
            guard kind >= 0 else { throw Fault.ud }
        case 0xA3: kind = 0
        case 0xAB: kind = 1
        case 0xB3: kind = 2
        default: kind = 3
        }
        let rex = i.hasREX
        let bits = UInt64(8 * i.size)
        var bit: UInt64
        var address: UInt64 = 0
        if i.isMem { address = ea(i) }
        if op == 0xBA {
            bit = (i.imm & 0xFF) % bits
        } else {
            let offset = Int64(bitPattern: Self.signExtend(reg(Int(i.reg), i.size, rex), i.size))
            if !i.isMem { bit = UInt64(bitPattern: offset) % bits } else {
                // A register bit offset reaches memory outside the operand (signed, in operand-size units).
                address = address &+ UInt64(bitPattern: (offset >> Int64(bits.trailingZeroBitCount)) &* Int64(i.size))
                bit = UInt64(bitPattern: offset) & (bits - 1)
            }
        }
        let v = i.isMem ? try read(address, size: i.size) : reg(Int(i.rm), i.size, rex)
        let saved = rflags
        rflags = (rflags & ~Flag.cf) | ((v >> bit) & 1 != 0 ? Flag.cf : 0)
        if kind != 0 {
            let r = kind == 1 ? v | (1 << bit) : kind == 2 ? v & ~(1 << bit) : v ^ (1 << bit)
            if i.isMem { try writeBack(address, r, i.size, flags: saved) } else { setReg(Int(i.rm), i.size, r, rex) }
        }
    }

    /// Group 7: VMCALL, SWAPGS, RDTSCP, CLAC/STAC and the descriptor-table instructions.
    private func group7(_ i: Instr, _ next: inout UInt64) throws(Fault) {
        if !i.isMem {
            switch i.modrm {
            case 0xD0, 0xD1:  // XGETBV, XSETBV
                try extendedControlRegister(i)
            case 0xC1, 0xD9:  // VMCALL, VMMCALL (either, as KVM takes both): the hypercall exit; RAX receives the result via completeHypercall
                exit(.hypercall(Hypercall(number: gpr[0], arg0: gpr[7], arg1: gpr[6], arg2: gpr[2], arg3: gpr[10], rbx: gpr[3], rcx: gpr[1])))
            case 0xCA, 0xCB:  // CLAC, STAC
                guard cpl == 0 else { throw Fault.ud }
                if i.modrm == 0xCA { rflags &= ~Flag.ac } else { rflags |= Flag.ac }
            case 0xF8:  // SWAPGS
                try requireCPL0()
                swap(&gs.base, &kernelGSBase)
            case 0xFF where i.rep == 0xF2:  // PVALIDATE (SEV-SNP)
                try pvalidate()
            case 0xF9:  // RDTSCP
                if cr4 & CR.tsd != 0 { try requireCPL0() }
                let tsc = instructions &+ tscOffset
                gpr[0] = tsc & 0xFFFF_FFFF
                gpr[2] = tsc >> 32
                gpr[1] = tscAux & 0xFFFF_FFFF
            default:
                switch i.ext {
                case 4:  // SMSW r
                    if cr4 & CR.umip != 0 { try requireCPL0() }
                    setReg(Int(i.rm), i.size, cr0 & Self.mask(i.size), i.hasREX)
                case 6:  // LMSW r
                    try requireCPL0()
                    try writeCR(0, (cr0 & ~0xE) | (gpr[Int(i.rm)] & 0xF) | (cr0 & CR.pe))
                default:
                    throw Fault.ud
                }
            }
            return
        }
        let a = ea(i)
        switch i.ext {
        case 0, 1:  // SGDT, SIDT
            if cr4 & CR.umip != 0 { try requireCPL0() }
            let t = i.ext == 0 ? gdt : idt
            try write(a, UInt64(t.limit), size: 2)
            try write(a &+ 2, t.base, size: 8)
        case 2, 3:  // LGDT, LIDT
            try requireCPL0()
            let limit = UInt16(try read(a, size: 2))
            let base = try read(a &+ 2, size: 8)
            guard Self.isCanonical(base) else { throw Fault.gp() }
            if i.ext == 2 { gdt = DescriptorTableRegister(base: base, limit: limit) } else { idt = DescriptorTableRegister(base: base, limit: limit) }
        case 4:  // SMSW m16
            if cr4 & CR.umip != 0 { try requireCPL0() }
            try write(a, cr0 & 0xFFFF, size: 2)
        case 6:  // LMSW m16
            try requireCPL0()
            let v = try read(a, size: 2)
            try writeCR(0, (cr0 & ~0xE) | (v & 0xF) | (cr0 & CR.pe))
        case 7:  // INVLPG
            try requireCPL0()
            invalidatePage(a)
            shadowPageInvalidated(a)
        default:
            throw Fault.ud
        }
    }

    func requireCPL0() throws(Fault) { if cpl != 0 { throw Fault.gp() } }

    /// MOV to CR0/CR2/CR3/CR4/CR8 with the checks long mode makes (no leaving long mode,
    /// no reserved bits, no PCIDs).
    func writeCR(_ n: Int, _ v: UInt64) throws(Fault) {
        switch n {
        case 0:
            guard v & ~CR.cr0Valid == 0 else { throw Fault.gp() }
            guard v & CR.pg == 0 || v & CR.pe != 0 else { throw Fault.gp() }
            // No leaving long mode from 64-bit code (compatibility mode may).
            guard v & CR.pg != 0 || efer & CR.eferLMA == 0 || !cs.l else { throw Fault.gp() }
            guard v & (1 << 29) == 0 || v & (1 << 30) != 0 else { throw Fault.gp() }  // NW without CD
            if v & CR.pg != 0 && cr0 & CR.pg == 0 && efer & CR.eferLME != 0 {  // activating long mode
                guard cr4 & CR.pae != 0 else { throw Fault.gp() }
                efer |= CR.eferLMA
            } else if v & CR.pg == 0 {
                efer &= ~CR.eferLMA
            }
            cr0 = v | CR.et
            flushTLB()
            shadowContextChanged()
        case 2: cr2 = v
        case 3:
            guard v & ~(Self.physicalAddressMask | 0x18) == 0 else { throw Fault.gp() }
            cr3 = v
            flushTLB()
            shadowContextChanged()
        case 4:
            guard v & ~CR.cr4Valid == 0 else { throw Fault.gp() }
            guard v & CR.pae != 0 || efer & CR.eferLMA == 0 else { throw Fault.gp() }
            cr4 = v
            flushTLB()
            shadowContextChanged()
        case 8:
            guard v & ~0xF == 0 else { throw Fault.gp() }
            cr8 = v
            if let apic = interruptController {
                apic.setTaskPriorityClass(vcpu: vcpuIndex, UInt8(v))
                attention = true  // a lower priority may let a requested interrupt in
            }
        default: throw Fault.ud
        }
    }

    /// VERR/VERW's test: `selector` names a code or data segment readable (`write`: a data
    /// segment writable) at the current privilege level. No fault for a null selector, one
    /// past its table's limit or a system segment — ZF clear; the present bit is not checked.
    func segmentAccessible(_ selector: UInt16, write: Bool) throws(Fault) -> Bool {
        guard selector & 0xFFFC != 0 else { return false }
        let local = selector & 4 != 0
        if local && (!ldtr.present || ldtr.unusable) { return false }
        let offset = UInt64(selector & 0xFFF8)
        guard offset + 7 <= (local ? UInt64(ldtr.limit) : UInt64(gdt.limit)) else { return false }
        let segment = Self.segment(selector, try readSystem((local ? ldtr.base : gdt.base) &+ offset, size: 8))
        guard segment.s else { return false }
        let code = segment.type & 8 != 0
        if write ? code || segment.type & 2 == 0 : code && segment.type & 2 == 0 { return false }
        let conforming = code && segment.type & 4 != 0
        return conforming || segment.dpl >= Swift.max(cpl, UInt8(selector & 3))
    }

    /// CPUID leaves: vendor "SwiftvisorSW", family 6; long mode, NX, 1 GiB pages, SYSCALL,
    /// RDTSCP, LAHF in 64-bit mode, POPCNT, LZCNT, CMPXCHG8B/16B, CMOV, TSC, MSR, PAE,
    /// PGE, SMEP, SMAP, FSGSBASE, UMIP, x87 (FPU, FCMOV via CMOV), FXSR, SSE, SSE2, CLFLUSH,
    /// XSAVE/XSAVEOPT (x87 and SSE components), CLFLUSHOPT, MMX. No SSE3+, AVX or BMI.
    func cpuid() {
        let leaf = UInt32(truncatingIfNeeded: gpr[0])
        let sub = UInt32(truncatingIfNeeded: gpr[1])
        var a: UInt32 = 0, b: UInt32 = 0, c: UInt32 = 0, d: UInt32 = 0
        switch leaf {
        case 0:
            a = 0xD
            b = 0x6669_7753  // "Swif"
            d = 0x7369_7674  // "tvis"
            c = 0x5753_726F  // "orSW"
        case 1:
            a = 0x0000_0600
            b = 8 << 8  // CLFLUSH line size 64 bytes
            c = (1 << 13) | (1 << 23) | (1 << 26)  // CX16, POPCNT, XSAVE
            if cr4 & CR.osxsave != 0 { c |= 1 << 27 }  // OSXSAVE mirrors CR4
            d = (1 << 0) | (1 << 3) | (1 << 4) | (1 << 5) | (1 << 6) | (1 << 8) | (1 << 13) | (1 << 15)  // FPU PSE TSC MSR PAE CX8 PGE CMOV
            d |= (1 << 16) | (1 << 19) | (1 << 23) | (1 << 24) | (1 << 25) | (1 << 26)  // PAT CLFSH MMX FXSR SSE SSE2
            if let p = platformMSRs {  // the VMM's local APIC (PC platform): APIC (while enabled), x2APIC, TSC deadline; initial APIC ID
                let base = p.readMSR(vcpu: vcpuIndex, index: MSR.apicBase, tsc: 0, apicBase: apicBase) ?? apicBase
                if base & (1 << 11) != 0 { d |= 1 << 9 }
                c |= 1 << 24; b |= UInt32(truncatingIfNeeded: vcpuIndex) << 24
                if p.x2APICAvailable { c |= 1 << 21 }
            }
        case 0xB where platformMSRs != nil:
            // x2APIC topology: one thread per core (level 0, SMT); EDX the x2APIC ID.
            if sub == 0 { a = 0; b = 1; c = 0x100 } else { c = sub & 0xFF }
            d = UInt32(truncatingIfNeeded: vcpuIndex)
        case 6 where platformMSRs != nil:
            a = 1 << 2  // ARAT: the PC platform's APIC timer runs in every C-state
        case 7 where sub == 0:
            b = (1 << 0) | (1 << 7) | (1 << 20) | (1 << 23)  // FSGSBASE, SMEP, SMAP, CLFLUSHOPT
            c = 1 << 2  // UMIP
        case 0xD:
            (a, b, c, d) = xsaveLeaf(sub)
        case 0x8000_0000:
            a = confidential == nil ? 0x8000_0008 : 0x8000_001F
        case 0x8000_0001:
            c = (1 << 0) | (1 << 5)  // LAHF/SAHF in 64-bit mode, LZCNT (ABM)
            d = (1 << 11) | (1 << 20) | (1 << 26) | (1 << 27) | (1 << 29)  // SYSCALL NX 1GB-pages RDTSCP LM
        case 0x8000_0002...0x8000_0004:
            // Brand string "Swiftvisor software x86-64", NUL-padded to 48 bytes.
            let brand: [UInt8] = Array("Swiftvisor software x86-64".utf8) + [UInt8](repeating: 0, count: 22)
            let base = Int(leaf - 0x8000_0002) * 16
            func word(_ k: Int) -> UInt32 {
                UInt32(brand[base + k]) | UInt32(brand[base + k + 1]) << 8 | UInt32(brand[base + k + 2]) << 16 | UInt32(brand[base + k + 3]) << 24
            }
            a = word(0); b = word(4); c = word(8); d = word(12)
        case 0x8000_0008:
            a = 0x3000 | UInt32(Self.maxPhysicalAddressBits)  // 48-bit linear, 40-bit physical
        case 0x8000_001F:
            if let m = confidentialCPUID() { a = m.a; b = m.b }
        default:
            break
        }
        gpr[0] = UInt64(a); gpr[3] = UInt64(b); gpr[1] = UInt64(c); gpr[2] = UInt64(d)
    }

    static let tscAuxMSR: UInt32 = 0xC000_0103
    /// IA32_MISC_ENABLE: fast strings on, branch-trace and PEBS unavailable.
    static let miscEnableMSR: UInt32 = 0x1A0
    static let miscEnable: UInt64 = 1 | 1 << 11 | 1 << 12

    func readMSR(_ index: UInt32) throws(Fault) -> UInt64 {
        switch index {
        case MSR.efer: return efer
        case MSR.fsBase: return fs.base
        case MSR.gsBase: return gs.base
        case MSR.kernelGSBase: return kernelGSBase
        case MSR.tsc: return instructions &+ tscOffset
        case MSR.apicBase:
            return platformMSRs?.readMSR(vcpu: vcpuIndex, index: index, tsc: instructions &+ tscOffset, apicBase: apicBase) ?? apicBase
        case MSR.star: return star
        case MSR.lstar: return lstar
        case MSR.cstar: return cstar
        case MSR.fmask: return fmask
        case MSR.pat: return pat
        case MSR.sysenterCS: return sysenterCS
        case MSR.sysenterESP: return sysenterESP
        case MSR.sysenterEIP: return sysenterEIP
        case Self.tscAuxMSR: return tscAux
        case Self.miscEnableMSR where platformMSRs == nil: return Self.miscEnable  // the PC platform keeps its own
        default:
            guard let v = platformMSRs?.readMSR(vcpu: vcpuIndex, index: index, tsc: instructions &+ tscOffset, apicBase: apicBase) else { throw Fault.gp() }
            return v
        }
    }

    func writeMSR(_ index: UInt32, _ v: UInt64) throws(Fault) {
        func canonical() throws(Fault) { guard Self.isCanonical(v) else { throw Fault.gp() } }
        switch index {
        case MSR.efer:
            guard v & ~(CR.eferSCE | CR.eferLME | CR.eferLMA | CR.eferNXE) == 0 else { throw Fault.gp() }
            guard (v & CR.eferLME != 0) == (efer & CR.eferLME != 0) || cr0 & CR.pg == 0 else { throw Fault.gp() }
            efer = (v & ~CR.eferLMA) | (efer & CR.eferLMA)  // LMA is read-only
            flushTLB()
            shadowContextChanged()
        case MSR.fsBase: try canonical(); fs.base = v
        case MSR.gsBase: try canonical(); gs.base = v
        case MSR.kernelGSBase: try canonical(); kernelGSBase = v
        case MSR.tsc: tscOffset = v &- instructions
        case MSR.apicBase:
            // Bits 0–7, 9 and those above the physical-address width are reserved.
            guard v & ~(Self.physicalAddressMask | 0xD00) == 0 else { throw Fault.gp() }
            if let p = platformMSRs {
                guard p.writeMSR(vcpu: vcpuIndex, index: index, value: v, tsc: instructions &+ tscOffset, apicBase: apicBase) else { throw Fault.gp() }
            }
            apicBase = v
        case MSR.star: star = v
        case MSR.lstar: try canonical(); lstar = v
        case MSR.cstar: try canonical(); cstar = v
        case MSR.fmask: fmask = v & 0xFFFF_FFFF
        case MSR.pat: pat = v
        case MSR.sysenterCS: sysenterCS = v
        case MSR.sysenterESP: try canonical(); sysenterESP = v
        case MSR.sysenterEIP: try canonical(); sysenterEIP = v
        case Self.tscAuxMSR: tscAux = v & 0xFFFF_FFFF
        case Self.miscEnableMSR where platformMSRs == nil: guard v == Self.miscEnable else { throw Fault.gp() }  // nothing here is switchable
        default:
            guard platformMSRs?.writeMSR(vcpu: vcpuIndex, index: index, value: v, tsc: instructions &+ tscOffset, apicBase: apicBase) == true else { throw Fault.gp() }
            attention = true  // an APIC write may have raised an interrupt
        }
    }
}
