import CHost
import VirtCore

/// The x87 FPU (opcodes D8–DF). Registers keep the full 80-bit extended format; the
/// arithmetic runs on the host's x87 under the guest's control word (precision and
/// rounding control), so results, condition codes and exception flags are the hardware's.
/// Not modelled: FIP/FDP/FOP tracking (saved as zero), FNSAVE/FRSTOR, FBLD/FBSTP, and
/// unmasked-exception delivery beyond setting ES and raising #MF on the next waiting
/// instruction (the result is written even for unmasked invalid-operation exceptions).
extension CPU {
    private enum X87 {
        static let scratchA = FloatingPointState.x87Scratch, scratchB = scratchA + 16
        static let scratchResult = scratchA + 32, scratchResult2 = scratchA + 48
        static let c0: UInt16 = 0x100, c1: UInt16 = 0x200, c2: UInt16 = 0x400, c3: UInt16 = 0x4000
        static let conditionCodes: UInt16 = c0 | c1 | c2 | c3
        static let invalid: UInt16 = 0x01, stackFault: UInt16 = 0x40
    }

    @inline(__always) private func scratch(_ offset: Int) -> UnsafeMutableRawPointer { fp.buffer + offset }

    /// Writes the x87 "real indefinite" QNaN to `p`.
    private func storeIndefinite(_ p: UnsafeMutableRawPointer) {
        p.storeBytes(of: 0xC000_0000_0000_0000 as UInt64, as: UInt64.self)
        p.storeBytes(of: 0xFFFF as UInt16, toByteOffset: 8, as: UInt16.self)
    }

    /// Stack overflow / underflow: IE and SF, C1 = overflow.
    private func stackFault(overflow: Bool) {
        fp.fsw = (fp.fsw & ~X87.c1) | X87.invalid | X87.stackFault | (overflow ? X87.c1 : 0)
    }

    /// Sets ES and B when an unmasked exception is pending.
    private func updateErrorSummary() {
        if fp.fsw & ~fp.fcw & 0x3F != 0 { fp.fsw |= 0x8080 } else { fp.fsw &= ~0x8080 }
    }

    /// ST(i) as an operand: empty registers give a stack underflow and the indefinite.
    private func operand(_ i: Int, into slot: Int) -> UnsafeMutableRawPointer {
        let p = scratch(slot)
        if fp.isValid(i) { p.copyMemory(from: fp.st(i), byteCount: 10) } else { stackFault(overflow: false); storeIndefinite(p) }
        return p
    }

    private func push(from p: UnsafeRawPointer) {
        let newTop = (fp.top + 7) & 7
        fp.fsw = (fp.fsw & ~0x3800) | UInt16(newTop) << 11
        let slot = fp.st(0)
        if fp.valid & (1 << UInt8(newTop)) != 0 {
            stackFault(overflow: true)
            storeIndefinite(slot)
        } else {
            slot.copyMemory(from: p, byteCount: 10)
        }
        fp.valid |= 1 << UInt8(newTop)
    }

    private func popStack() {
        let t = fp.top
        fp.valid &= ~(1 << UInt8(t))
        fp.fsw = (fp.fsw & ~0x3800) | UInt16((t + 1) & 7) << 11
    }

    private func setST(_ i: Int, from p: UnsafeRawPointer) {
        fp.st(i).copyMemory(from: p, byteCount: 10)
        fp.valid |= 1 << UInt8((fp.top + i) & 7)
    }

    /// Runs a host operation on the scratch operands; merges its exception flags and
    /// (for comparisons and partial remainders) its condition codes.
    @discardableResult
    private func hostOperation(_ op: UInt32, conditionCodes: Bool = false, twoResults: Bool = false) -> UInt16 {
        var status: UInt16 = 0
        host_x87_execute(op, scratch(X87.scratchA), scratch(X87.scratchB), scratch(X87.scratchResult),
                         twoResults ? scratch(X87.scratchResult2) : nil, fp.fcw, &status)
        if op == 10 || op == 11 {
            fp.fsw = (fp.fsw & ~X87.c1) | ((status >> 8) & 0x3F)
            return status & 0x45
        }
        fp.fsw |= status & 0x3F
        if conditionCodes {
            fp.fsw = (fp.fsw & ~X87.conditionCodes) | (status & X87.conditionCodes)
        } else {
            fp.fsw = (fp.fsw & ~X87.c1) | (status & X87.c1)
        }
        return status
    }

    /// A memory operand as an 80-bit value in scratch B: m32fp/m64fp, or m16/32/64int.
    private func loadMemoryOperand(_ a: UInt64, size: Int, integer: Bool) throws(Fault) -> UnsafeMutableRawPointer {
        let bits = try read(a, size: size)
        var status: UInt16 = 0
        host_x87_load(bits, Int32(size), integer ? 1 : 0, scratch(X87.scratchB), &status)
        fp.fsw |= status & 0x3F  // a signalling NaN loads as a QNaN with IE
        return scratch(X87.scratchB)
    }

    func executeX87(_ i: Instr) throws(Fault) {
        if cr0 & (CR.em | CR.ts) != 0 { throw Fault.nm }
        let op = Int(i.op), ext = i.ext, modrm = i.modrm
        let nonWaiting = (op == 0xDB && (modrm == 0xE2 || modrm == 0xE3)) || (op == 0xDF && modrm == 0xE0)
            || (i.isMem && (op == 0xD9 || op == 0xDD) && ext >= 6)
        if !nonWaiting && fp.fsw & 0x80 != 0 && cr0 & CR.ne != 0 { throw Fault.mf }
        fp.inUse |= 1
        if i.isMem { try x87Memory(i, op, ext) } else { try x87Register(i, op, ext, Int(modrm & 7)) }
        updateErrorSummary()
    }

    /// The arithmetic operations of D8/DC/DA/DE (/0–/7) as host operation numbers.
    @inline(__always) private static func arithmeticOp(_ ext: Int) -> UInt32 { ext <= 1 ? UInt32(ext) : ext <= 3 ? 2 : UInt32(ext) }

    /// ST(0) op value-in-scratch-B, into ST(0) (compares set C0–C3 and FCOMP pops).
    private func arithmeticOnTop(_ ext: Int) {
        _ = operand(0, into: X87.scratchA)
        if ext == 2 || ext == 3 {
            hostOperation(2, conditionCodes: true)
            fp.fsw &= ~X87.c1
            if ext == 3 { popStack() }
            return
        }
        hostOperation(Self.arithmeticOp(ext))
        setST(0, from: scratch(X87.scratchResult))
    }

    private func x87Memory(_ i: Instr, _ op: Int, _ ext: Int) throws(Fault) {
        let a = ea(i)
        switch op {
        case 0xD8, 0xDC, 0xDA, 0xDE:  // arithmetic with m32fp, m64fp, m32int, m16int
            let size = op == 0xD8 || op == 0xDA ? 4 : op == 0xDC ? 8 : 2
            _ = try loadMemoryOperand(a, size: size, integer: op == 0xDA || op == 0xDE)
            arithmeticOnTop(ext)
        case 0xD9, 0xDD, 0xDB, 0xDF:
            switch (op, ext) {
            case (0xD9, 0), (0xDD, 0), (0xDB, 0), (0xDF, 0), (0xDF, 5):  // FLD m32/m64, FILD m32/m16/m64
                let size = op == 0xD9 ? 4 : op == 0xDD ? 8 : op == 0xDB ? 4 : ext == 5 ? 8 : 2
                let p = try loadMemoryOperand(a, size: size, integer: op == 0xDB || op == 0xDF)
                push(from: p)
            case (0xDB, 5):  // FLD m80
                let lo = try read(a, size: 8), hi = try read(a &+ 8, size: 2)
                let p = scratch(X87.scratchB)
                p.storeBytes(of: lo, as: UInt64.self)
                p.storeBytes(of: UInt16(hi), toByteOffset: 8, as: UInt16.self)
                push(from: p)
            case (0xD9, 2), (0xD9, 3), (0xDD, 2), (0xDD, 3):  // FST/FSTP m32/m64
                let p = operand(0, into: X87.scratchA)
                var status: UInt16 = 0
                let size = op == 0xD9 ? 4 : 8
                let v = host_x87_to_float(p, Int32(size), fp.fcw, &status)
                try write(a, v, size: size)
                fp.fsw = (fp.fsw & ~X87.c1) | (status & (0x3F | X87.c1))
                if ext == 3 { popStack() }
            case (0xDB, 7):  // FSTP m80
                let p = operand(0, into: X87.scratchA)
                let lo = p.load(as: UInt64.self), hi = p.load(fromByteOffset: 8, as: UInt16.self)
                _ = try translate(a &+ 9, write: true, user: cs.dpl == 3)
                try write(a, lo, size: 8)
                try write(a &+ 8, UInt64(hi), size: 2)
                popStack()
            case (0xDB, 1...3), (0xDD, 1), (0xDF, 1...3), (0xDF, 7):  // FISTTP, FIST, FISTP
                let size = op == 0xDB ? 4 : op == 0xDD ? 8 : ext == 7 ? 8 : 2
                let p = operand(0, into: X87.scratchA)
                var status: UInt16 = 0
                let v = host_x87_to_integer(p, Int32(size), ext == 1 ? 1 : 0, fp.fcw, &status)
                try write(a, v, size: size)
                fp.fsw = (fp.fsw & ~X87.c1) | (status & (0x3F | X87.c1))
                if ext != 2 { popStack() }
            case (0xD9, 5):  // FLDCW (bit 6 reads as 1)
                fp.fcw = UInt16(try read(a, size: 2)) | 0x40
            case (0xD9, 7):  // FNSTCW
                try write(a, UInt64(fp.fcw), size: 2)
            case (0xDD, 7):  // FNSTSW m16
                try write(a, UInt64(fp.fsw), size: 2)
            case (0xD9, 6):  // FNSTENV (28-byte format): then all exceptions masked
                try storeEnvironment(a)
                fp.fcw |= 0x3F
            case (0xD9, 4):  // FLDENV
                try loadEnvironment(a)
            default:
                throw Fault.ud
            }
        default:
            throw Fault.ud
        }
    }

    /// The full tag word: 00 valid, 01 zero, 10 special, 11 empty, per physical register.
    private func fullTagWord() -> UInt16 {
        var tags: UInt16 = 0
        for r in 0..<8 {
            let tag: UInt16
            if fp.valid & (1 << UInt8(r)) == 0 {
                tag = 3
            } else {
                let p = fp.buffer + FloatingPointState.x87Registers + 16 * r
                let significand = p.load(as: UInt64.self), exponent = p.load(fromByteOffset: 8, as: UInt16.self) & 0x7FFF
                if exponent == 0 { tag = significand == 0 ? 1 : 2 } else if exponent == 0x7FFF || significand >> 63 == 0 { tag = 2 } else { tag = 0 }
            }
            tags |= tag << UInt16(2 * r)
        }
        return tags
    }

    private func storeEnvironment(_ a: UInt64) throws(Fault) {
        _ = try translate(a &+ 27, write: true, user: cs.dpl == 3)
        try write(a, UInt64(fp.fcw) | 0xFFFF_0000, size: 4)
        try write(a &+ 4, UInt64(fp.fsw) | 0xFFFF_0000, size: 4)
        try write(a &+ 8, UInt64(fullTagWord()) | 0xFFFF_0000, size: 4)
        try write(a &+ 12, fp.fip & 0xFFFF_FFFF, size: 4)
        try write(a &+ 16, UInt64(fp.fop) << 16, size: 4)
        try write(a &+ 20, fp.fdp & 0xFFFF_FFFF, size: 4)
        try write(a &+ 24, 0xFFFF_0000, size: 4)
    }

    private func loadEnvironment(_ a: UInt64) throws(Fault) {
        let fcw = try read(a, size: 2), fsw = try read(a &+ 4, size: 2), tags = try read(a &+ 8, size: 2)
        fp.fcw = UInt16(fcw) | 0x40
        fp.fsw = UInt16(fsw)
        var valid: UInt8 = 0
        for r in 0..<8 where (tags >> UInt64(2 * r)) & 3 != 3 { valid |= 1 << UInt8(r) }
        fp.valid = valid
    }

    private func x87Register(_ i: Instr, _ op: Int, _ ext: Int, _ n: Int) throws(Fault) {
        switch op {
        case 0xD8:  // ST(0) op ST(i)
            _ = operand(n, into: X87.scratchB)
            arithmeticOnTop(ext)
        case 0xDC, 0xDE:  // ST(i) op ST(0) (DE: then pop); DE D9 is FCOMPP
            if op == 0xDE && (ext == 2 || ext == 3) {
                guard i.modrm == 0xD9 else { throw Fault.ud }
                _ = operand(1, into: X87.scratchB)
                arithmeticOnTop(3)
                popStack()
                return
            }
            if ext == 2 || ext == 3 {  // FCOM/FCOMP aliases
                _ = operand(n, into: X87.scratchB)
                arithmeticOnTop(ext)
                return
            }
            _ = operand(n, into: X87.scratchA)
            _ = operand(0, into: X87.scratchB)
            hostOperation(ext <= 1 ? UInt32(ext) : UInt32(ext ^ 1))
            setST(n, from: scratch(X87.scratchResult))
            if op == 0xDE { popStack() }
        case 0xD9:
            try x87D9(i, ext, n)
        case 0xDA, 0xDB:
            if ext <= 3 {  // FCMOVcc / FCMOVNcc
                let f = rflags
                let cond: Bool
                switch ext {
                case 0: cond = f & Flag.cf != 0
                case 1: cond = f & Flag.zf != 0
                case 2: cond = f & (Flag.cf | Flag.zf) != 0
                default: cond = f & Flag.pf != 0
                }
                let source = operand(n, into: X87.scratchB)
                if cond == (op == 0xDA) { setST(0, from: source) }
                return
            }
            if op == 0xDA {
                guard i.modrm == 0xE9 else { throw Fault.ud }  // FUCOMPP
                _ = operand(0, into: X87.scratchA)
                _ = operand(1, into: X87.scratchB)
                hostOperation(3, conditionCodes: true)
                fp.fsw &= ~X87.c1
                popStack(); popStack()
                return
            }
            switch i.modrm {
            case 0xE0, 0xE1, 0xE4: break  // FENI, FDISI, FSETPM: no-ops since the 80287
            case 0xE2: fp.fsw &= ~0x80FF  // FNCLEX
            case 0xE3: fp.resetX87()  // FNINIT
            default:
                guard ext == 5 || ext == 6 else { throw Fault.ud }
                try compareIntoFlags(n, unordered: ext == 5, pop: false)
            }
        case 0xDD:
            switch ext {
            case 0: fp.valid &= ~(1 << UInt8((fp.top + n) & 7))  // FFREE
            case 2, 3:  // FST/FSTP ST(i)
                let p = operand(0, into: X87.scratchA)
                setST(n, from: p)
                if ext == 3 { popStack() }
            case 4, 5:  // FUCOM/FUCOMP
                _ = operand(0, into: X87.scratchA)
                _ = operand(n, into: X87.scratchB)
                hostOperation(3, conditionCodes: true)
                fp.fsw &= ~X87.c1
                if ext == 5 { popStack() }
            default: throw Fault.ud
            }
        default:  // DF
            if i.modrm == 0xE0 {  // FNSTSW AX
                gpr[0] = (gpr[0] & ~0xFFFF) | UInt64(fp.fsw)
            } else if ext == 5 || ext == 6 {  // FUCOMIP, FCOMIP
                try compareIntoFlags(n, unordered: ext == 5, pop: true)
            } else {
                throw Fault.ud
            }
        }
    }

    private func compareIntoFlags(_ n: Int, unordered: Bool, pop: Bool) throws(Fault) {
        _ = operand(0, into: X87.scratchA)
        _ = operand(n, into: X87.scratchB)
        let flags = hostOperation(unordered ? 11 : 10)
        rflags = (rflags & ~Flag.arithmetic) | UInt64(flags)
        if pop { popStack() }
    }

    private func x87D9(_ i: Instr, _ ext: Int, _ n: Int) throws(Fault) {
        switch ext {
        case 0:  // FLD ST(i)
            let p = operand(n, into: X87.scratchB)
            push(from: p)
            return
        case 1:  // FXCH
            let a = operand(0, into: X87.scratchA), b = operand(n, into: X87.scratchB)
            setST(0, from: b)
            setST(n, from: a)
            fp.fsw &= ~X87.c1
            return
        default: break
        }
        let m = i.modrm
        switch m {
        case 0xD0: break  // FNOP
        case 0xE0, 0xE1:  // FCHS, FABS
            let p = operand(0, into: X87.scratchA)
            let hi = p.load(fromByteOffset: 8, as: UInt16.self)
            p.storeBytes(of: m == 0xE0 ? hi ^ 0x8000 : hi & 0x7FFF, toByteOffset: 8, as: UInt16.self)
            setST(0, from: p)
            fp.fsw &= ~X87.c1
        case 0xE4:  // FTST
            _ = operand(0, into: X87.scratchA)
            scratch(X87.scratchB).initializeMemory(as: UInt8.self, repeating: 0, count: 16)
            hostOperation(2, conditionCodes: true)
            fp.fsw &= ~X87.c1
        case 0xE5:  // FXAM
            let p = fp.st(0)
            let significand = p.load(as: UInt64.self), word = p.load(fromByteOffset: 8, as: UInt16.self)
            let exponent = word & 0x7FFF
            var c: UInt16
            if !fp.isValid(0) { c = X87.c3 | X87.c0 }
            else if exponent == 0x7FFF { c = significand << 1 == 0 ? X87.c2 | X87.c0 : X87.c0 }
            else if exponent == 0 { c = significand == 0 ? X87.c3 : X87.c3 | X87.c2 }
            else { c = significand >> 63 == 0 ? 0 : X87.c2 }
            if word & 0x8000 != 0 { c |= X87.c1 }
            fp.fsw = (fp.fsw & ~X87.conditionCodes) | c
        case 0xE8...0xEE:  // FLD1 FLDL2T FLDL2E FLDPI FLDLG2 FLDLN2 FLDZ
            hostOperation(21 + UInt32(m - 0xE8))
            push(from: scratch(X87.scratchResult))
        case 0xF0, 0xFA, 0xFC, 0xFE, 0xFF:  // F2XM1, FSQRT, FRNDINT, FSIN, FCOS
            _ = operand(0, into: X87.scratchA)
            let hostOp: UInt32 = m == 0xF0 ? 12 : m == 0xFA ? 8 : m == 0xFC ? 9 : m == 0xFE ? 13 : 14
            hostOperation(hostOp, conditionCodes: m >= 0xFE)
            setST(0, from: scratch(X87.scratchResult))
        case 0xF1, 0xF3, 0xF9:  // FYL2X, FPATAN, FYL2XP1: into ST(1), pop
            _ = operand(0, into: X87.scratchA)
            _ = operand(1, into: X87.scratchB)
            hostOperation(m == 0xF1 ? 15 : m == 0xF3 ? 16 : 17)
            setST(1, from: scratch(X87.scratchResult))
            popStack()
        case 0xF5, 0xF8, 0xFD:  // FPREM1, FPREM, FSCALE: into ST(0)
            _ = operand(0, into: X87.scratchA)
            _ = operand(1, into: X87.scratchB)
            hostOperation(m == 0xF5 ? 19 : m == 0xF8 ? 18 : 20, conditionCodes: m != 0xFD)
            setST(0, from: scratch(X87.scratchResult))
        case 0xF2, 0xFB, 0xF4:  // FPTAN, FSINCOS, FXTRACT: ST(0) replaced, a second value pushed
            _ = operand(0, into: X87.scratchA)
            hostOperation(m == 0xF2 ? 28 : m == 0xFB ? 29 : 30, conditionCodes: m != 0xF4, twoResults: true)
            setST(0, from: scratch(X87.scratchResult))
            push(from: scratch(X87.scratchResult2))
        case 0xF6, 0xF7:  // FDECSTP, FINCSTP
            let t = (fp.top + (m == 0xF6 ? 7 : 1)) & 7
            fp.fsw = (fp.fsw & ~(0x3800 | X87.c1)) | UInt16(t) << 11
        default:
            throw Fault.ud
        }
    }
}

extension CPU {
    /// FWAIT: #NM with CR0.MP and TS; #MF when an unmasked x87 exception is pending.
    func waitForFPU() throws(Fault) {
        if cr0 & (CR.mp | CR.ts) == CR.mp | CR.ts { throw Fault.nm }
        if fp.fsw & 0x80 != 0 && cr0 & CR.ne != 0 { throw Fault.mf }
    }
}
