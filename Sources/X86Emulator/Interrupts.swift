import VirtCore

extension CPU {
    /// The 8-byte descriptor for `selector` in the GDT (supervisor access).
    func descriptor(_ selector: UInt16) throws(Fault) -> UInt64 {
        let offset = UInt64(selector & 0xFFF8)
        guard selector & 4 == 0, offset + 7 <= UInt64(gdt.limit) else { throw Fault.gp(UInt32(selector & 0xFFFC)) }
        return try read(gdt.base &+ offset, size: 8, user: false)
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

    /// MOV Sreg: 0 ES, 2 SS, 3 DS, 4 FS, 5 GS (CS cannot be loaded this way).
    func loadSegment(_ n: Int, _ selector: UInt16) throws(Fault) {
        var seg: SegmentRegister
        if selector & 0xFFFC == 0 {
            guard n != 2 || cpl == 0 else { throw Fault.gp() }
            seg = SegmentRegister(selector: selector, unusable: true)
        } else {
            seg = Self.segment(selector, try descriptor(selector))
            guard seg.present else { throw Fault.exception(vector: n == 2 ? 12 : 11, errorCode: UInt32(selector & 0xFFFC)) }
        }
        switch n {
        case 0: es = seg
        case 2: ss = seg
        case 3: ds = seg
        case 4: seg.base = selector & 0xFFFC == 0 ? 0 : seg.base; fs = seg
        case 5: seg.base = selector & 0xFFFC == 0 ? 0 : seg.base; gs = seg
        default: throw Fault.ud
        }
    }

    func loadCodeSegment(_ selector: UInt16) throws(Fault) {
        guard selector & 0xFFFC != 0 else { throw Fault.gp() }
        var seg = Self.segment(selector, try descriptor(selector))
        guard seg.present, seg.s, seg.type & 8 != 0 else { throw Fault.gp(UInt32(selector & 0xFFFC)) }
        seg.dpl = UInt8(selector & 3)  // CPL is the RPL of the loaded CS
        cs = seg
    }

    func loadTaskRegister(_ selector: UInt16) throws(Fault) {
        let low = try descriptor(selector)
        let high = try read(gdt.base &+ UInt64(selector & 0xFFF8) &+ 8, size: 8, user: false)
        var seg = Self.segment(selector, low)
        guard seg.present, !seg.s, seg.type == 0x9 else { throw Fault.gp(UInt32(selector & 0xFFFC)) }
        seg.base |= (high & 0xFFFF_FFFF) << 32
        seg.type = 0xB  // busy
        tr = seg
        try write(gdt.base &+ UInt64(selector & 0xFFF8), low | (UInt64(2) << 40), size: 8, user: false)
    }

    /// IRETQ: pops RIP, CS, RFLAGS, RSP, SS (all five in 64-bit mode).
    func iret() throws(Fault) {
        let sp = gpr[4]
        let newRIP = try read(sp, size: 8)
        let newCS = UInt16(truncatingIfNeeded: try read(sp &+ 8, size: 8))
        let newFlags = try read(sp &+ 16, size: 8)
        let newRSP = try read(sp &+ 24, size: 8)
        let newSS = UInt16(truncatingIfNeeded: try read(sp &+ 32, size: 8))
        let oldCPL = cpl
        guard newCS & 3 >= UInt16(oldCPL) else { throw Fault.gp(UInt32(newCS & 0xFFFC)) }
        try loadCodeSegment(newCS)
        if newSS & 0xFFFC == 0 {
            ss = SegmentRegister(selector: newSS, unusable: true)
        } else {
            ss = Self.segment(newSS, try descriptor(newSS))
        }
        var changeable: UInt64 = Flag.arithmetic | Flag.tf | Flag.df | Flag.nt | Flag.ac | Flag.rf | (1 << 21)
        if oldCPL == 0 { changeable |= Flag.iopl }
        if oldCPL <= UInt8((rflags >> 12) & 3) { changeable |= Flag.if }
        rflags = (rflags & ~changeable) | (newFlags & changeable) | 0x2
        gpr[4] = newRSP
        rip = newRIP
    }

    /// Delivers an exception or interrupt through the IDT (64-bit gates). Throws if the
    /// delivery itself faults, which the caller escalates (#DF, then triple fault).
    /// `software`: INT n / INT3 (gate DPL is checked). `fault`: a fault-class exception,
    /// whose pushed RFLAGS image has RF set so the retried instruction is not re-trapped.
    func deliver(vector: UInt8, errorCode: UInt32?, software: Bool, fault: Bool = false) throws(Fault) {
        let offset = UInt64(vector) * 16
        guard offset + 15 <= UInt64(idt.limit) else { throw Fault.gp(UInt32(vector) * 8 + 2) }
        let low = try read(idt.base &+ offset, size: 8, user: false)
        let high = try read(idt.base &+ offset &+ 8, size: 8, user: false)
        let type = (low >> 40) & 0xF
        guard low & (1 << 47) != 0, type == 0xE || type == 0xF else { throw Fault.gp(UInt32(vector) * 8 + 2) }
        let gateDPL = UInt8((low >> 45) & 3)
        if software && gateDPL < cpl { throw Fault.gp(UInt32(vector) * 8 + 2) }
        let target = (low & 0xFFFF) | ((low >> 32) & 0xFFFF_0000) | (high << 32)
        let selector = UInt16(truncatingIfNeeded: low >> 16)
        var newCS = Self.segment(selector, try descriptor(selector))
        guard newCS.present, newCS.l else { throw Fault.gp(UInt32(selector & 0xFFFC)) }
        let oldCPL = cpl, newCPL = newCS.dpl
        let ist = Int((low >> 32) & 7)
        var rsp = gpr[4]
        if ist != 0 {
            rsp = try read(tr.base &+ 0x24 &+ UInt64(ist - 1) * 8, size: 8, user: false)
        } else if newCPL < oldCPL {
            rsp = try read(tr.base &+ 4, size: 8, user: false)
        }
        rsp &= ~0xF
        let pushedFlags = fault ? rflags | Flag.rf : rflags
        let frame = (UInt64(ss.selector), gpr[4], pushedFlags, UInt64(cs.selector), rip, UInt64(errorCode ?? 0))
        let count = errorCode == nil ? 5 : 6
        // Check the whole frame is writable before writing any of it.
        _ = try translate(rsp &- UInt64(8 * count), write: true, user: false)
        _ = try translate(rsp &- 8, write: true, user: false)
        try withUnsafeBytes(of: frame) { raw throws(Fault) in
            for i in 0..<count {
                rsp &-= 8
                try write(rsp, raw.load(fromByteOffset: i * 8, as: UInt64.self), size: 8, user: false)
            }
        }
        if newCPL < oldCPL { ss = SegmentRegister(selector: UInt16(newCPL), unusable: true) }
        newCS.selector = (selector & 0xFFFC) | UInt16(newCPL)
        cs = newCS
        gpr[4] = rsp
        rflags &= ~(Flag.tf | Flag.nt | Flag.rf)
        if type == 0xE { rflags &= ~Flag.if }
        rip = target
    }
}
