import VirtCore

extension CPU {
    // MARK: Operands

    /// Linear address of the memory operand (RIP-relative counts from the instruction's end).
    @inline(__always)
    func ea(_ i: Instr) -> UInt64 {
        var a = i.disp
        let b = Int(i.base)
        if b < 16 { a &+= gpr[b] } else if b == 17 { a &+= rip &+ UInt64(i.length) }
        if i.index < 16 { a &+= gpr[Int(i.index)] &<< UInt64(i.scale) }
        if i.pfx & Instr.P.addr32 != 0 { a &= 0xFFFF_FFFF }
        if i.seg != 0 { a &+= i.seg == 1 ? fs.base : gs.base }
        return a
    }

    @inline(__always)
    func reg(_ n: Int, _ size: Int, _ rex: Bool) -> UInt64 {
        switch size {
        case 1:
            if !rex && n >= 4 && n < 8 { return (gpr[n - 4] >> 8) & 0xFF }
            return gpr[n] & 0xFF
        case 2: return gpr[n] & 0xFFFF
        case 4: return gpr[n] & 0xFFFF_FFFF
        default: return gpr[n]
        }
    }

    @inline(__always)
    func setReg(_ n: Int, _ size: Int, _ v: UInt64, _ rex: Bool) {
        switch size {
        case 1:
            if !rex && n >= 4 && n < 8 {
                gpr[n - 4] = (gpr[n - 4] & ~0xFF00) | ((v & 0xFF) << 8)
            } else {
                gpr[n] = (gpr[n] & ~0xFF) | (v & 0xFF)
            }
        case 2: gpr[n] = (gpr[n] & ~0xFFFF) | (v & 0xFFFF)
        case 4: gpr[n] = v & 0xFFFF_FFFF
        default: gpr[n] = v
        }
    }

    @inline(__always)
    func readRM(_ i: Instr, _ size: Int) throws(Fault) -> UInt64 {
        i.isMem ? try read(ea(i), size: size) : reg(Int(i.rm), size, i.hasREX)
    }

    @inline(__always)
    func writeRM(_ i: Instr, _ size: Int, _ v: UInt64) throws(Fault) {
        if i.isMem { try write(ea(i), v, size: size) } else { setReg(Int(i.rm), size, v, i.hasREX) }
    }

    /// Writes the result of a read-modify-write; if the write faults, the flags the
    /// instruction already computed are rolled back so the retry starts from the same state.
    @inline(__always)
    func writeBack(_ address: UInt64, _ v: UInt64, _ size: Int, flags saved: UInt64) throws(Fault) {
        do { try write(address, v, size: size) } catch { rflags = saved; throw error }
    }

    // MARK: Flags

    @inline(__always)
    static func mask(_ size: Int) -> UInt64 { size >= 8 ? ~0 : (1 << UInt64(8 * size)) - 1 }
    @inline(__always)
    static func sign(_ size: Int) -> UInt64 { 1 << UInt64(8 * size - 1) }
    @inline(__always)
    static func signExtend(_ v: UInt64, _ size: Int) -> UInt64 {
        let s = UInt64(64 - 8 * size)
        return UInt64(bitPattern: Int64(bitPattern: v << s) >> Int64(s))
    }

    @inline(__always)
    func setResultFlags(_ r: UInt64, _ size: Int, carry: Bool, overflow: Bool, aux: Bool) {
        var f = rflags & ~Flag.arithmetic
        if carry { f |= Flag.cf }
        if overflow { f |= Flag.of }
        if aux { f |= Flag.af }
        if r & Self.mask(size) == 0 { f |= Flag.zf }
        if r & Self.sign(size) != 0 { f |= Flag.sf }
        if (r & 0xFF).nonzeroBitCount & 1 == 0 { f |= Flag.pf }
        rflags = f
    }

    /// The eight classic ALU operations (ADD OR ADC SBB AND SUB XOR CMP) with exact flags.
    /// CMP returns its first operand.
    @inline(__always)
    func alu(_ op: Int, _ a: UInt64, _ b: UInt64, _ size: Int) -> UInt64 {
        let m = Self.mask(size), s = Self.sign(size)
        switch op {
        case 0, 2:  // ADD, ADC
            let c: UInt64 = op == 2 && rflags & Flag.cf != 0 ? 1 : 0
            let r = (a &+ b &+ c) & m
            let carry = size == 8 ? (r < a || (c == 1 && r == a)) : (a + b + c) > m
            setResultFlags(r, size, carry: carry, overflow: (a ^ r) & (b ^ r) & s != 0, aux: (a ^ b ^ r) & 0x10 != 0)
            return r
        case 3, 5, 7:  // SBB, SUB, CMP
            let c: UInt64 = op == 3 && rflags & Flag.cf != 0 ? 1 : 0
            let r = (a &- b &- c) & m
            setResultFlags(r, size, carry: a < b || (c == 1 && a == b), overflow: (a ^ b) & (a ^ r) & s != 0, aux: (a ^ b ^ r) & 0x10 != 0)
            return op == 7 ? a : r
        case 1: let r = (a | b) & m; setResultFlags(r, size, carry: false, overflow: false, aux: false); return r
        case 4: let r = (a & b) & m; setResultFlags(r, size, carry: false, overflow: false, aux: false); return r
        default: let r = (a ^ b) & m; setResultFlags(r, size, carry: false, overflow: false, aux: false); return r
        }
    }

    /// Shifts and rotates (group 2: ROL ROR RCL RCR SHL SHR SAL SAR). A masked count of 0
    /// changes nothing, flags included.
    func shift(_ op: Int, _ a: UInt64, _ rawCount: UInt64, _ size: Int) -> UInt64 {
        let bits = UInt64(8 * size)
        let count = rawCount & (size == 8 ? 63 : 31)
        if count == 0 { return a }
        let m = Self.mask(size), s = Self.sign(size)
        var r = a, cf = rflags & Flag.cf != 0, of = rflags & Flag.of != 0
        switch op {
        case 0:  // ROL
            let c = count % bits
            r = c == 0 ? a : ((a << c) | (a >> (bits - c))) & m
            cf = r & 1 != 0
            of = (r & s != 0) != cf
            rflags = (rflags & ~(Flag.cf | Flag.of)) | (cf ? Flag.cf : 0) | (of ? Flag.of : 0)
            return r
        case 1:  // ROR
            let c = count % bits
            r = c == 0 ? a : ((a >> c) | (a << (bits - c))) & m
            cf = r & s != 0
            of = (r & s != 0) != (r & (s >> 1) != 0)
            rflags = (rflags & ~(Flag.cf | Flag.of)) | (cf ? Flag.cf : 0) | (of ? Flag.of : 0)
            return r
        case 2, 3:  // RCL, RCR through CF, one bit at a time (rare)
            let c = count % (bits + 1)
            for _ in 0..<c {
                if op == 2 {
                    let out = r & s != 0
                    r = ((r << 1) | (cf ? 1 : 0)) & m
                    cf = out
                } else {
                    let out = r & 1 != 0
                    r = (r >> 1) | (cf ? s : 0)
                    cf = out
                }
            }
            of = op == 2 ? ((r & s != 0) != cf) : ((r & s != 0) != (r & (s >> 1) != 0))
            rflags = (rflags & ~(Flag.cf | Flag.of)) | (cf ? Flag.cf : 0) | (of ? Flag.of : 0)
            return r
        case 4, 6:  // SHL/SAL
            r = count >= bits ? 0 : (a << count) & m
            cf = count <= bits && (a >> (bits - count)) & 1 != 0
            of = (r & s != 0) != cf
        case 5:  // SHR
            r = count >= bits ? 0 : a >> count
            cf = (a >> (count - 1)) & 1 != 0
            of = a & s != 0
        default:  // SAR
            let signed = Int64(bitPattern: a << (64 - bits)) >> Int64(64 - bits)
            r = UInt64(bitPattern: signed >> Int64(min(count, 63))) & m
            cf = (UInt64(bitPattern: signed) >> (count - 1)) & 1 != 0
            of = false
        }
        setResultFlags(r, size, carry: cf, overflow: of, aux: false)
        return r
    }

    @inline(__always)
    func condition(_ cc: Int) -> Bool {
        let f = rflags
        let r: Bool
        switch cc >> 1 {
        case 0: r = f & Flag.of != 0
        case 1: r = f & Flag.cf != 0
        case 2: r = f & Flag.zf != 0
        case 3: r = f & (Flag.cf | Flag.zf) != 0
        case 4: r = f & Flag.sf != 0
        case 5: r = f & Flag.pf != 0
        case 6: r = (f & Flag.sf != 0) != (f & Flag.of != 0)
        default: r = f & Flag.zf != 0 || (f & Flag.sf != 0) != (f & Flag.of != 0)
        }
        return cc & 1 == 0 ? r : !r
    }

    @inline(__always)
    func imul(_ a: UInt64, _ b: UInt64, _ size: Int) -> UInt64 {
        let sa = Int64(bitPattern: Self.signExtend(a, size))
        let sb = Int64(bitPattern: Self.signExtend(b, size))
        let (p, overflow64) = sa.multipliedReportingOverflow(by: sb)
        let r = UInt64(bitPattern: p) & Self.mask(size)
        let overflow = size == 8 ? overflow64 : Int64(bitPattern: Self.signExtend(r, size)) != p
        rflags = (rflags & ~(Flag.cf | Flag.of)) | (overflow ? Flag.cf | Flag.of : 0)
        return r
    }
}
