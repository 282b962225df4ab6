import VirtCore

/// Decoded prefixes and ModRM of the instruction being executed.
struct Decoded {
    var start: UInt64 = 0
    var opsize16 = false
    var rep: UInt8 = 0        // 0xF3, 0xF2 or 0
    var segmentBase: UInt64 = 0
    var rex: UInt8 = 0
    var hasREX = false
    // ModRM
    var mod = 0, reg = 0, rm = 0
    var isRegister = false
    var address: UInt64 = 0
    var ripRelative = false

    var rexW: Bool { rex & 8 != 0 }
    /// Operand size for non-byte instructions.
    var size: Int { rexW ? 8 : (opsize16 ? 2 : 4) }
}

/// What the interpreter loop stops for.
enum StepOutcome {
    case next
    case exit(VMExit)
}

extension CPU {
    // MARK: Fetch

    @inline(__always)
    func fetch8(_ d: inout Decoded, _ pos: inout UInt64) throws(Fault) -> UInt64 {
        let gpa = try translate(pos, write: false, execute: true, user: cpl == 3)
        guard gpa < ramSize else { throw Fault.exception(vector: 14, errorCode: 0x11) }
        pos &+= 1
        return UInt64((ram + Int(gpa)).load(as: UInt8.self))
    }

    @inline(__always)
    func fetch(_ d: inout Decoded, _ pos: inout UInt64, _ n: Int) throws(Fault) -> UInt64 {
        var v: UInt64 = 0
        for i in 0..<n { v |= try fetch8(&d, &pos) << (8 * UInt64(i)) }
        return v
    }

    /// Sign-extended immediate of `n` bytes.
    @inline(__always)
    func fetchSigned(_ d: inout Decoded, _ pos: inout UInt64, _ n: Int) throws(Fault) -> UInt64 {
        let v = try fetch(&d, &pos, n)
        let shift = UInt64(64 - 8 * n)
        return UInt64(bitPattern: Int64(bitPattern: v << shift) >> Int64(shift))
    }

    func decodeModRM(_ d: inout Decoded, _ pos: inout UInt64) throws(Fault) {
        let m = Int(try fetch8(&d, &pos))
        d.mod = m >> 6
        d.reg = ((m >> 3) & 7) | (d.rex & 4 != 0 ? 8 : 0)
        let rmLow = m & 7
        if d.mod == 3 {
            d.isRegister = true
            d.rm = rmLow | (d.rex & 1 != 0 ? 8 : 0)
            return
        }
        d.isRegister = false
        var ea: UInt64 = 0
        if rmLow == 4 {
            let sib = Int(try fetch8(&d, &pos))
            let scale = sib >> 6
            let index = ((sib >> 3) & 7) | (d.rex & 2 != 0 ? 8 : 0)
            let base = (sib & 7) | (d.rex & 1 != 0 ? 8 : 0)
            if index != 4 { ea = gpr[index] << UInt64(scale) }
            if (sib & 7) == 5 && d.mod == 0 {
                ea &+= try fetchSigned(&d, &pos, 4)
            } else {
                ea &+= gpr[base]
            }
        } else if rmLow == 5 && d.mod == 0 {
            d.ripRelative = true
            ea = try fetchSigned(&d, &pos, 4)
        } else {
            ea = gpr[rmLow | (d.rex & 1 != 0 ? 8 : 0)]
        }
        if d.mod == 1 { ea &+= try fetchSigned(&d, &pos, 1) }
        if d.mod == 2 { ea &+= try fetchSigned(&d, &pos, 4) }
        d.address = ea &+ d.segmentBase
    }

    /// The memory operand's address; call after all immediates are fetched (RIP-relative
    /// addressing counts from the end of the instruction).
    @inline(__always)
    func effectiveAddress(_ d: Decoded, _ pos: UInt64) -> UInt64 {
        d.ripRelative ? d.address &+ pos : d.address
    }

    // MARK: Registers by size

    @inline(__always)
    func reg(_ n: Int, _ size: Int, _ d: Decoded) -> UInt64 {
        switch size {
        case 1:
            if !d.hasREX && n >= 4 && n < 8 { return (gpr[n - 4] >> 8) & 0xFF }
            return gpr[n] & 0xFF
        case 2: return gpr[n] & 0xFFFF
        case 4: return gpr[n] & 0xFFFF_FFFF
        default: return gpr[n]
        }
    }

    @inline(__always)
    func setReg(_ n: Int, _ size: Int, _ v: UInt64, _ d: Decoded) {
        switch size {
        case 1:
            if !d.hasREX && n >= 4 && n < 8 {
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
    func readRM(_ d: Decoded, _ pos: UInt64, _ size: Int) throws(Fault) -> UInt64 {
        d.isRegister ? reg(d.rm, size, d) : try read(effectiveAddress(d, pos), size: size)
    }

    @inline(__always)
    func writeRM(_ d: Decoded, _ pos: UInt64, _ size: Int, _ v: UInt64) throws(Fault) {
        if d.isRegister { setReg(d.rm, size, v, d) } else { try write(effectiveAddress(d, pos), v, size: size) }
    }

    // MARK: Flags

    @inline(__always)
    static func mask(_ size: Int) -> UInt64 { size == 8 ? ~0 : (1 << UInt64(8 * size)) - 1 }
    @inline(__always)
    static func sign(_ size: Int) -> UInt64 { 1 << UInt64(8 * size - 1) }

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

    /// Shifts and rotates (group 2: ROL ROR RCL RCR SHL SHR SAL SAR).
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
}
