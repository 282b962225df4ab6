import VirtCore

extension CPU {
    /// The 8-byte descriptor for `selector` from the GDT or LDT (supervisor access).
    func descriptor(_ selector: UInt16) throws(Fault) -> UInt64 {
        let offset = UInt64(selector & 0xFFF8)
        let table = selector & 4 == 0 ? (gdt.base, UInt64(gdt.limit)) : (ldtr.base, UInt64(ldtr.limit))
        guard selector & 4 == 0 || (ldtr.present && !ldtr.unusable) else { throw Fault.gp(UInt32(selector & 0xFFFC)) }
        guard offset + 7 <= table.1 else { throw Fault.gp(UInt32(selector & 0xFFFC)) }
        return try readSystem(table.0 &+ offset, size: 8)
    }

    static func segment(_ selector: UInt16, _ desc: UInt64) -> SegmentRegister {
        let base = ((desc >> 16) & 0xFF_FFFF) | ((desc >> 32) & 0xFF00_0000)
        var limit = UInt32((desc & 0xFFFF) | ((desc >> 32) & 0xF_0000))
        let g = desc & (1 << 55) != 0
        if g { limit = (limit << 12) | 0xFFF }
        return SegmentRegister(selector: selector, base: base, limit: limit, type: UInt8((desc >> 40) & 0xF),
                               present: desc & (1 << 47) != 0, dpl: UInt8((desc >> 45) & 3), db: desc & (1 << 54) != 0,
                               s: desc & (1 << 44) != 0, l: desc & (1 << 53) != 0, g: g, avl: desc & (1 << 52) != 0)
    }

    /// MOV/POP Sreg: 0 ES, 2 SS, 3 DS, 4 FS, 5 GS (CS cannot be loaded this way), with the
    /// protected-mode type and privilege checks.
    func loadSegment(_ n: Int, _ selector: UInt16) throws(Fault) {
        let code = UInt32(selector & 0xFFFC)
        let rpl = UInt8(selector & 3)
        var seg: SegmentRegister
        if selector & 0xFFFC == 0 {
            // A null SS is allowed in 64-bit mode below CPL3 (with RPL = CPL).
            guard n != 2 || (cpl != 3 && rpl == cpl) else { throw Fault.gp() }
            seg = SegmentRegister(selector: selector, unusable: true)
        } else {
            seg = Self.segment(selector, try descriptor(selector))
            guard seg.s else { throw Fault.gp(code) }
            if n == 2 {
                guard seg.type & 0xA == 0x2, rpl == cpl, seg.dpl == cpl else { throw Fault.gp(code) }  // writable data
                guard seg.present else { throw Fault.ss(code) }
            } else {
                let data = seg.type & 8 == 0
                guard data || seg.type & 2 != 0 else { throw Fault.gp(code) }  // data or readable code
                if data || seg.type & 4 == 0 { guard seg.dpl >= max(cpl, rpl) else { throw Fault.gp(code) } }
                guard seg.present else { throw Fault.exception(vector: 11, errorCode: code) }
            }
        }
        switch n {
        case 0: es = seg
        case 2: ss = seg
        case 3: ds = seg
        case 4: fs = seg
        case 5: gs = seg
        default: throw Fault.ud
        }
    }

    /// The code segment a far transfer or interrupt return loads: present, 64-bit code (the
    /// engine runs no compatibility-mode code), with the privilege rules of `newCPL`.
    func codeSegment(_ selector: UInt16, newCPL: UInt8, returning: Bool) throws(Fault) -> SegmentRegister {
        let code = UInt32(selector & 0xFFFC)
        guard selector & 0xFFFC != 0 else { throw Fault.gp() }
        var seg = Self.segment(selector, try descriptor(selector))
        guard seg.s, seg.type & 8 != 0, seg.l, !seg.db else { throw Fault.gp(code) }
        let conforming = seg.type & 4 != 0
        if returning {
            guard conforming ? seg.dpl <= newCPL : seg.dpl == newCPL else { throw Fault.gp(code) }
        } else {
            guard conforming ? seg.dpl <= cpl : (seg.dpl == cpl && UInt8(selector & 3) <= cpl) else { throw Fault.gp(code) }
        }
        guard seg.present else { throw Fault.exception(vector: 11, errorCode: code) }
        seg.dpl = newCPL  // the model's CPL is CS.DPL
        seg.selector = (selector & 0xFFFC) | UInt16(newCPL)
        return seg
    }

    func loadTaskRegister(_ selector: UInt16) throws(Fault) {
        guard selector & 4 == 0 else { throw Fault.gp(UInt32(selector & 0xFFFC)) }
        let low = try descriptor(selector)
        let high = try readSystem(gdt.base &+ UInt64(selector & 0xFFF8) &+ 8, size: 8)
        var seg = Self.segment(selector, low)
        guard !seg.s, seg.type == 0x9 else { throw Fault.gp(UInt32(selector & 0xFFFC)) }
        guard seg.present else { throw Fault.exception(vector: 11, errorCode: UInt32(selector & 0xFFFC)) }
        seg.base |= (high & 0xFFFF_FFFF) << 32
        seg.type = 0xB  // busy
        try writeSystem(gdt.base &+ UInt64(selector & 0xFFF8), low | (UInt64(2) << 40), size: 8)
        tr = seg
    }

    func loadLDT(_ selector: UInt16) throws(Fault) {
        if selector & 0xFFFC == 0 { ldtr = SegmentRegister(selector: selector, unusable: true); return }
        guard selector & 4 == 0 else { throw Fault.gp(UInt32(selector & 0xFFFC)) }
        let low = try descriptor(selector)
        let high = try readSystem(gdt.base &+ UInt64(selector & 0xFFF8) &+ 8, size: 8)
        var seg = Self.segment(selector, low)
        guard !seg.s, seg.type == 0x2 else { throw Fault.gp(UInt32(selector & 0xFFFC)) }
        guard seg.present else { throw Fault.exception(vector: 11, errorCode: UInt32(selector & 0xFFFC)) }
        seg.base |= (high & 0xFFFF_FFFF) << 32
        ldtr = seg
    }

    /// Returning to an outer privilege level nulls data segment registers the new level
    /// may not use.
    private func dropInaccessibleDataSegments(newCPL: UInt8) {
        func check(_ s: inout SegmentRegister) {
            if !s.unusable && s.selector & 0xFFFC != 0 && (s.type & 8 == 0 || s.type & 4 == 0) && s.dpl < newCPL {
                s = SegmentRegister(selector: 0, unusable: true)
            }
        }
        check(&es); check(&ds)
        // FS and GS keep their 64-bit bases, as on hardware.
        if !fs.unusable && fs.dpl < newCPL && fs.selector & 0xFFFC != 0 { fs.selector = 0 }
        if !gs.unusable && gs.dpl < newCPL && gs.selector & 0xFFFC != 0 { gs.selector = 0 }
    }

    /// RET far (`lret`, `lretq`) to the same or an outer privilege level.
    func farReturn(_ i: Instr) throws(Fault) -> UInt64 {
        let n = UInt64(i.rexW ? 8 : (i.opsize16 ? 2 : 4))
        let sp = gpr[4]
        let target = try read(sp, size: Int(n))
        let sel = UInt16(truncatingIfNeeded: try read(sp &+ n, size: Int(n)))
        let extra = Int(i.op) == 0xCA ? i.imm & 0xFFFF : 0
        let rpl = UInt8(sel & 3)
        guard rpl >= cpl else { throw Fault.gp(UInt32(sel & 0xFFFC)) }
        let newCS = try codeSegment(sel, newCPL: rpl, returning: true)
        guard Self.isCanonical(target) else { throw Fault.gp() }
        if rpl > cpl {
            let newRSP = try read(sp &+ 2 * n &+ extra, size: Int(n))
            let ssSel = UInt16(truncatingIfNeeded: try read(sp &+ 3 * n &+ extra, size: Int(n)))
            let newSS = try stackSegment(ssSel, cpl: rpl)
            cs = newCS
            ss = newSS
            gpr[4] = newRSP &+ extra
            dropInaccessibleDataSegments(newCPL: rpl)
        } else {
            cs = newCS
            gpr[4] = sp &+ 2 * n &+ extra
        }
        return target
    }

    func farJump(_ i: Instr) throws(Fault) -> UInt64 {
        let (target, sel) = try farPointer(i)
        cs = try codeSegment(sel, newCPL: cpl, returning: false)
        return target
    }

    func farCall(_ i: Instr, _ next: UInt64) throws(Fault) -> UInt64 {
        let (target, sel) = try farPointer(i)
        let newCS = try codeSegment(sel, newCPL: cpl, returning: false)
        let n = i.rexW ? 8 : (i.opsize16 ? 2 : 4)
        let sp = gpr[4]
        try write(sp &- UInt64(n), UInt64(cs.selector), size: n)
        try write(sp &- UInt64(2 * n), next, size: n)
        gpr[4] = sp &- UInt64(2 * n)
        cs = newCS
        return target
    }

    /// m16:16/32/64 far pointer (call gates and task switches are not supported).
    private func farPointer(_ i: Instr) throws(Fault) -> (UInt64, UInt16) {
        let a = ea(i)
        let n = i.rexW ? 8 : (i.opsize16 ? 2 : 4)
        let target = try read(a, size: n)
        let sel = UInt16(truncatingIfNeeded: try read(a &+ UInt64(n), size: 2))
        guard Self.isCanonical(target) else { throw Fault.gp() }
        return (target, sel)
    }

    private func stackSegment(_ selector: UInt16, cpl newCPL: UInt8) throws(Fault) -> SegmentRegister {
        if selector & 0xFFFC == 0 {
            guard newCPL != 3 else { throw Fault.gp() }
            return SegmentRegister(selector: selector, unusable: true)
        }
        let code = UInt32(selector & 0xFFFC)
        let seg = Self.segment(selector, try descriptor(selector))
        guard seg.s, seg.type & 0xA == 0x2, UInt8(selector & 3) == newCPL, seg.dpl == newCPL else { throw Fault.gp(code) }
        guard seg.present else { throw Fault.ss(code) }
        return seg
    }

    /// IRET (IRETQ with REX.W): pops RIP, CS, RFLAGS, RSP and SS, all five in 64-bit mode.
    func iret(size n: Int) throws(Fault) {
        let w = UInt64(n)
        let sp = gpr[4]
        let newRIP = try read(sp, size: n)
        let newCSSel = UInt16(truncatingIfNeeded: try read(sp &+ w, size: n))
        let newFlags = try read(sp &+ 2 * w, size: n)
        let newRSP = try read(sp &+ 3 * w, size: n)
        let newSSSel = UInt16(truncatingIfNeeded: try read(sp &+ 4 * w, size: n))
        let oldCPL = cpl
        let rpl = UInt8(newCSSel & 3)
        guard rpl >= oldCPL else { throw Fault.gp(UInt32(newCSSel & 0xFFFC)) }
        let newCS = try codeSegment(newCSSel, newCPL: rpl, returning: true)
        let newSS = try stackSegment(newSSSel, cpl: rpl)
        guard Self.isCanonical(newRIP) else { throw Fault.gp() }
        var changeable: UInt64 = Flag.arithmetic | Flag.tf | Flag.df | Flag.nt | Flag.ac | Flag.rf | Flag.id
        if oldCPL == 0 { changeable |= Flag.iopl }
        if oldCPL <= UInt8((rflags >> 12) & 3) { changeable |= Flag.if }
        if n == 2 { changeable &= 0xFFFF }
        rflags = (rflags & ~changeable) | (newFlags & changeable) | 0x2
        cs = newCS
        ss = newSS
        gpr[4] = newRSP
        rip = newRIP
        if rpl > oldCPL { dropInaccessibleDataSegments(newCPL: rpl) }
        if nmiBlocked {  // IRET ends NMI blocking; an NMI held meanwhile is taken next
            nmiBlocked = false
            attention = true
        }
    }

    /// Delivers an exception or interrupt through the IDT (64-bit gates). Throws if the
    /// delivery itself faults, which the caller escalates (#DF, then triple fault).
    /// `software`: INT n / INT3 (gate DPL is checked). `fault`: a fault-class exception,
    /// whose pushed RFLAGS image has RF set so the retried instruction is not re-trapped.
    /// `external`: sets the EXT bit of error codes this delivery raises.
    func deliver(vector: UInt8, errorCode: UInt32?, software: Bool, fault: Bool = false, external: Bool = true) throws(Fault) {
        let ext: UInt32 = software || !external ? 0 : 1
        let idtCode = UInt32(vector) * 8 + 2 + ext
        let offset = UInt64(vector) * 16
        guard offset + 15 <= UInt64(idt.limit) else { throw Fault.gp(idtCode) }
        let low = try readSystem(idt.base &+ offset, size: 8)
        let high = try readSystem(idt.base &+ offset &+ 8, size: 8)
        let type = (low >> 40) & 0x1F  // S bit and type: 0x0E interrupt gate, 0x0F trap gate
        guard type == 0xE || type == 0xF else { throw Fault.gp(idtCode) }
        let gateDPL = UInt8((low >> 45) & 3)
        if software && gateDPL < cpl { throw Fault.gp(idtCode) }
        guard low & (1 << 47) != 0 else { throw Fault.exception(vector: 11, errorCode: idtCode) }
        let target = (low & 0xFFFF) | ((low >> 32) & 0xFFFF_0000) | (high << 32)
        let selector = UInt16(truncatingIfNeeded: low >> 16)
        let selCode = (UInt32(selector) & 0xFFFC) + ext
        guard selector & 0xFFFC != 0 else { throw Fault.gp(ext) }
        var newCS = Self.segment(selector, try descriptor(selector))
        guard newCS.s, newCS.type & 8 != 0, newCS.l, !newCS.db, newCS.dpl <= cpl else { throw Fault.gp(selCode) }
        guard newCS.present else { throw Fault.exception(vector: 11, errorCode: selCode) }
        let oldCPL = cpl
        let newCPL = newCS.type & 4 != 0 ? oldCPL : newCS.dpl  // conforming: CPL stays
        let ist = Int((low >> 32) & 7)
        var rsp = gpr[4]
        if ist != 0 {
            rsp = try readSystem(tr.base &+ 0x24 &+ UInt64(ist - 1) * 8, size: 8)
        } else if newCPL < oldCPL {
            rsp = try readSystem(tr.base &+ 4 &+ UInt64(newCPL) * 8, size: 8)
        }
        guard Self.isCanonical(rsp) else { throw Fault.ss(ext) }
        rsp &= ~0xF
        let pushedFlags = fault ? rflags | Flag.rf : rflags
        let frame = (UInt64(ss.selector), gpr[4], pushedFlags, UInt64(cs.selector), rip, UInt64(errorCode ?? 0))
        let count = errorCode == nil ? 5 : 6
        // Every push is a supervisor access at the new privilege level; check the whole
        // frame is writable before writing any of it.
        _ = try translate(rsp &- UInt64(8 * count), write: true, user: false)
        _ = try translate(rsp &- 8, write: true, user: false)
        try withUnsafeBytes(of: frame) { raw throws(Fault) in
            for k in 0..<count {
                rsp &-= 8
                try write(rsp, raw.load(fromByteOffset: k * 8, as: UInt64.self), size: 8, user: false)
            }
        }
        if newCPL < oldCPL { ss = SegmentRegister(selector: UInt16(newCPL), unusable: true) }
        newCS.dpl = newCPL
        newCS.selector = (selector & 0xFFFC) | UInt16(newCPL)
        cs = newCS
        gpr[4] = rsp
        rflags &= ~(Flag.tf | Flag.nt | Flag.rf | Flag.vm)
        if type == 0xE { rflags &= ~Flag.if }
        rip = target
        interruptShadow = false
    }

    /// Contributory exceptions (#DE, #TS, #NP, #SS, #GP) for the double-fault rules.
    static func isContributory(_ v: UInt8) -> Bool { v == 0 || (v >= 10 && v <= 13) }

    /// Whether exception `second`, raised while delivering `first`, makes a #DF.
    static func isDoubleFault(first: UInt8, second: UInt8) -> Bool {
        let firstClass = isContributory(first) ? 1 : (first == 14 ? 2 : 0)
        let secondClass = isContributory(second) ? 1 : (second == 14 ? 2 : 0)
        return (firstClass == 1 && secondClass == 1) || (firstClass == 2 && secondClass != 0)
    }

    /// Raises `vector` in the guest, applying the double-fault rules when delivery itself
    /// faults (Intel SDM Vol. 3 Table 6-5). Returns false on a triple fault.
    /// `after`: the exception whose delivery raised this one, outside this call.
    /// `instructionStart`: for INT n/INT3/INT1 (RIP already past it), where the instruction
    /// begins: an exception its delivery raises is a fault reported there (SDM Vol. 3A §6.5).
    func raise(vector: UInt8, errorCode: UInt32?, software: Bool, fault: Bool, external: Bool = true, after: UInt8? = nil,
               instructionStart: UInt64? = nil) -> Bool {
        var v = vector, code = errorCode, sw = software, isFault = fault
        var first = vector
        if let prior = after {
            if prior == 8 { return false }
            if Self.isDoubleFault(first: prior, second: vector) { v = 8; code = 0 }
            first = v
        }
        var attempts = 0
        while attempts < 4 {
            attempts += 1
            do throws(Fault) {
                try deliver(vector: v, errorCode: code, software: sw, fault: isFault, external: external)
                return true
            } catch {
                if case let .shadowFault(linear, shadowCode) = error {
                    // As an EPT violation: the VMM fills the shadow table (or finds a guest
                    // #PF, which it injects after this event), then delivery is retried.
                    pendingEvent = PendingEvent(vector: v, errorCode: code, software: sw, fault: isFault, external: external)
                    exit(.shadowPaging(.pageFault(linear: linear, errorCode: shadowCode)))
                    return true
                }
                if case let .secondLevelViolation(gpa, access) = error {
                    // The VMM resolves the EPT violation; the event is delivered again on
                    // the next run() (as VMX re-injects an event whose delivery exited).
                    pendingEvent = PendingEvent(vector: v, errorCode: code, software: sw, fault: isFault, external: external)
                    exit(.memoryFault(gpa: gpa, access: MemoryAccessKind(rawValue: access)))
                    return true
                }
                guard case let .exception(second, secondCode) = error else { return false }
                if v == 8 { return false }  // fault while delivering #DF: triple fault
                if let start = instructionStart, attempts == 1 { rip = start }
                if Self.isDoubleFault(first: first, second: second) {
                    v = 8; code = 0
                } else {
                    v = second; code = secondCode
                }
                first = v
                sw = false
                isFault = true
            }
        }
        return false
    }
}
