import KVMEngine
import TestSupport
import Testing
import VirtCore
@testable import X86Emulator

/// Random SSE/SSE2 (and x87) instruction sequences over XMM registers, general-purpose
/// registers, MXCSR and the stack page, run at CPL3 on the real CPU (KVM) and on the
/// software engine, interpreted and translated.
enum VectorSequenceGenerator {
    /// Interesting 32- and 64-bit floating-point patterns: zeros, ones, infinities, quiet
    /// and signalling NaNs, denormals, extremes, integers, values that round.
    static let doubles: [UInt64] = [0, 1 << 63, 0x3FF0_0000_0000_0000, 0xBFF8_0000_0000_0000, 0x7FF0_0000_0000_0000,
                                    0xFFF0_0000_0000_0000, 0x7FF8_0000_0000_0000, 0x7FF4_0000_0000_0001, 0x0000_0000_0000_0001,
                                    0x000F_FFFF_FFFF_FFFF, 0x7FEF_FFFF_FFFF_FFFF, 0x0010_0000_0000_0000, 0x41DF_FFFF_FFC0_0000,
                                    0x43E0_0000_0000_0000, 0xC3E0_0000_0000_0000, 0x3FD5_5555_5555_5555, 0x4024_0000_0000_0000,
                                    0x3FE0_0000_0000_0000, 0x4004_0000_0000_0000, 0xC004_0000_0000_0000]
    static let floats: [UInt32] = [0, 0x8000_0000, 0x3F80_0000, 0xBFC0_0000, 0x7F80_0000, 0xFF80_0000, 0x7FC0_0000, 0x7FA0_0001,
                                   0x0000_0001, 0x007F_FFFF, 0x7F7F_FFFF, 0x0080_0000, 0x4F00_0000, 0xCF00_0000, 0x3EAA_AAAB,
                                   0x3F00_0000, 0x4020_0000, 0xC020_0000]

    static func lane(_ g: inout SplitMix64) -> UInt64 {
        switch g.next() % 4 {
        case 0: return g.next()
        case 1: return doubles[Int(g.next() % UInt64(doubles.count))]
        case 2: return UInt64(floats[Int(g.next() % UInt64(floats.count))]) | UInt64(floats[Int(g.next() % UInt64(floats.count))]) << 32
        default: return SequenceGenerator.value(&g)
        }
    }

    /// Register-register instructions: (mandatory prefix, opcode, imm8 values or nil).
    static let binary: [(UInt8?, UInt8)] = {
        var ops: [(UInt8?, UInt8)] = []
        for op: UInt8 in [0x14, 0x15, 0x51, 0x52, 0x53, 0x54, 0x55, 0x56, 0x57, 0x58, 0x59, 0x5A, 0x5B, 0x5C, 0x5D, 0x5E, 0x5F] {
            ops.append((nil, op))
        }
        for op: UInt8 in [0x14, 0x15, 0x51, 0x54, 0x55, 0x56, 0x57, 0x58, 0x59, 0x5A, 0x5B, 0x5C, 0x5D, 0x5E, 0x5F, 0xE6, 0x6F] {
            ops.append((0x66, op))
        }
        for op in 0x60...0x6D { ops.append((0x66, UInt8(op))) }
        for op: UInt8 in [0x74, 0x75, 0x76, 0xD1, 0xD2, 0xD3, 0xD4, 0xD5, 0xD8, 0xD9, 0xDA, 0xDB, 0xDC, 0xDD, 0xDE, 0xDF,
                          0xE0, 0xE1, 0xE2, 0xE3, 0xE4, 0xE5, 0xE8, 0xE9, 0xEA, 0xEB, 0xEC, 0xED, 0xEE, 0xEF,
                          0xF1, 0xF2, 0xF3, 0xF4, 0xF5, 0xF6, 0xF8, 0xF9, 0xFA, 0xFB, 0xFC, 0xFD, 0xFE, 0xD6] {
            ops.append((0x66, op))
        }
        for op: UInt8 in [0x10, 0x11, 0x51, 0x52, 0x53, 0x58, 0x59, 0x5A, 0x5B, 0x5C, 0x5D, 0x5E, 0x5F, 0xE6, 0x7E, 0x6F, 0x7F] {
            ops.append((0xF3, op))
        }
        for op: UInt8 in [0x10, 0x11, 0x51, 0x58, 0x59, 0x5A, 0x5C, 0x5D, 0x5E, 0x5F, 0xE6] { ops.append((0xF2, op)) }
        for op: UInt8 in [0x10, 0x11, 0x12, 0x16, 0x28, 0x29] { ops.append((nil, op)) }
        return ops
    }()

    static func encode(_ prefix: UInt8?, _ opcode: UInt8, reg: Int, rm: Int, w: Bool = false, memory: [UInt8]? = nil) -> [UInt8] {
        var bytes: [UInt8] = prefix.map { [$0] } ?? []
        let rex = UInt8(0x40) | (w ? 8 : 0) | UInt8((reg >> 3) << 2) | (memory == nil ? UInt8(rm >> 3) : 0)
        if rex != 0x40 { bytes.append(rex) }
        bytes += [0x0F, opcode]
        if let memory { bytes.append(0x44 | UInt8((reg & 7) << 3)); bytes += memory } else { bytes.append(0xC0 | UInt8((reg & 7) << 3) | UInt8(rm & 7)) }
        return bytes
    }

    /// `[rsp + disp8]` (SIB form); aligned: a multiple of 16 below RSP.
    static func stackOperand(_ g: inout SplitMix64, aligned: Bool) -> [UInt8] {
        let disp = aligned ? -16 * Int(1 + g.next() % 6) : -Int(1 + g.next() % 100)
        return [0x24, UInt8(bitPattern: Int8(disp))]
    }

    static let mxcsrValues: [UInt32] = [0x1F80, 0x3F80, 0x5F80, 0x7F80, 0x9F80, 0x1FC0, 0x9FC0]

    static func instruction(_ g: inout SplitMix64) -> GeneratedInstruction {
        let x = Int(g.next() % 16), y = Int(g.next() % 16)
        let gp = SequenceGenerator.registers[Int(g.next() % UInt64(SequenceGenerator.registers.count))]
        let w = g.next() & 1 == 0
        switch g.next() % 20 {
        case 0...7:
            let (p, op) = binary[Int(g.next() % UInt64(binary.count))]
            return GeneratedInstruction(bytes: encode(p, op, reg: x, rm: y), definesFlags: nil)
        case 8:  // shuffles and compares with an immediate
            let forms: [(UInt8?, UInt8)] = [(0x66, 0x70), (0xF3, 0x70), (0xF2, 0x70), (nil, 0xC6), (0x66, 0xC6),
                                             (nil, 0xC2), (0x66, 0xC2), (0xF3, 0xC2), (0xF2, 0xC2)]
            let (p, op) = forms[Int(g.next() % UInt64(forms.count))]
            let imm = op == 0xC2 ? UInt8(g.next() % 8) : UInt8(truncatingIfNeeded: g.next())
            return GeneratedInstruction(bytes: encode(p, op, reg: x, rm: y) + [imm], definesFlags: nil)
        case 9:  // shifts by an immediate
            let (op, ext): (UInt8, Int) = [(0x71, 2), (0x71, 4), (0x71, 6), (0x72, 2), (0x72, 4), (0x72, 6),
                                           (0x73, 2), (0x73, 3), (0x73, 6), (0x73, 7)][Int(g.next() % 10)]
            let counts: [UInt8] = [0, 1, 7, 8, 15, 16, 31, 32, 63, 64, 200]
            return GeneratedInstruction(bytes: encode(0x66, op, reg: ext, rm: x) + [counts[Int(g.next() % UInt64(counts.count))]], definesFlags: nil)
        case 10:  // results in general-purpose registers
            let forms: [(UInt8?, UInt8, Bool)] = [(nil, 0x50, false), (0x66, 0x50, false), (0x66, 0xD7, false),
                                                  (0xF3, 0x2C, true), (0xF3, 0x2D, true), (0xF2, 0x2C, true), (0xF2, 0x2D, true),
                                                  (0x66, 0x7E, true)]
            let (p, op, wide) = forms[Int(g.next() % UInt64(forms.count))]
            if op == 0x7E { return GeneratedInstruction(bytes: encode(p, op, reg: x, rm: gp, w: w), definesFlags: nil) }
            return GeneratedInstruction(bytes: encode(p, op, reg: gp, rm: x, w: wide && w), definesFlags: nil)
        case 11:  // from general-purpose registers
            let forms: [(UInt8?, UInt8)] = [(0xF3, 0x2A), (0xF2, 0x2A), (0x66, 0x6E)]
            let (p, op) = forms[Int(g.next() % 3)]
            return GeneratedInstruction(bytes: encode(p, op, reg: x, rm: gp, w: w), definesFlags: nil)
        case 12:  // PINSRW, PEXTRW
            if g.next() & 1 == 0 { return GeneratedInstruction(bytes: encode(0x66, 0xC4, reg: x, rm: gp) + [UInt8(g.next() % 8)], definesFlags: nil) }
            return GeneratedInstruction(bytes: encode(0x66, 0xC5, reg: gp, rm: x) + [UInt8(g.next() % 8)], definesFlags: nil)
        case 13:  // (U)COMISS/SD define ZF PF CF and clear OF SF AF
            let forms: [(UInt8?, UInt8)] = [(nil, 0x2E), (nil, 0x2F), (0x66, 0x2E), (0x66, 0x2F)]
            let (p, op) = forms[Int(g.next() % 4)]
            return GeneratedInstruction(bytes: encode(p, op, reg: x, rm: y), definesFlags: true)
        case 14:  // unaligned loads and stores on the stack page
            let forms: [(UInt8?, UInt8)] = [(nil, 0x10), (nil, 0x11), (0xF3, 0x6F), (0xF3, 0x7F), (0xF3, 0x10), (0xF3, 0x11),
                                            (0xF2, 0x10), (0xF2, 0x11), (nil, 0x12), (nil, 0x13), (nil, 0x16), (nil, 0x17),
                                            (0xF3, 0x7E), (0x66, 0xD6), (0xF2, 0x58), (0xF3, 0x59), (0x66, 0x2F)]
            let (p, op) = forms[Int(g.next() % UInt64(forms.count))]
            return GeneratedInstruction(bytes: encode(p, op, reg: x, rm: 0, memory: stackOperand(&g, aligned: false)), definesFlags: op == 0x2F ? true : nil)
        case 15:  // aligned loads, stores and arithmetic with memory
            let forms: [(UInt8?, UInt8)] = [(nil, 0x28), (nil, 0x29), (0x66, 0x6F), (0x66, 0x7F), (nil, 0x58), (0x66, 0xEF),
                                            (0x66, 0x74), (0x66, 0xFE), (0x66, 0x5E), (nil, 0x2B), (0x66, 0xE7)]
            let (p, op) = forms[Int(g.next() % UInt64(forms.count))]
            return GeneratedInstruction(bytes: encode(p, op, reg: x, rm: 0, memory: stackOperand(&g, aligned: true)), definesFlags: nil)
        case 16:  // a new MXCSR (rounding mode, FTZ, DAZ) through memory: mov dword [rsp-8], imm; ldmxcsr [rsp-8]; stmxcsr [rsp-12]
            let v = mxcsrValues[Int(g.next() % UInt64(mxcsrValues.count))]
            let imm = withUnsafeBytes(of: v.littleEndian) { Array($0) }
            return GeneratedInstruction(bytes: [0xC7, 0x44, 0x24, 0xF8] + imm + [0x0F, 0xAE, 0x54, 0x24, 0xF8, 0x0F, 0xAE, 0x5C, 0x24, 0xF4],
                                        definesFlags: nil)
        case 17:  // x87: load two doubles from the stack page, operate, store the result back
            let arithmetic: UInt8 = [0xC1, 0xC9, 0xE1, 0xE9, 0xF1, 0xF9][Int(g.next() % 6)]  // faddp fmulp fsubrp fsubp fdivrp fdivp
            var b: [UInt8] = storeLow(x, disp: 0xE0)
            b += storeLow(y, disp: 0xE8)
            b += [0xDD, 0x44, 0x24, 0xE0, 0xDD, 0x44, 0x24, 0xE8, 0xDE, arithmetic]
            b += g.next() & 1 == 0 ? [0xDD, 0x5C, 0x24, 0xD0] : [0xDB, 0x5C, 0x24, 0xD0]  // fstp m64 / fistp m32
            return GeneratedInstruction(bytes: b, definesFlags: nil)
        case 18:  // x87 constants, compare into EFLAGS, control and status words
            let constant: UInt8 = [0xE8, 0xEB, 0xED, 0xEE][Int(g.next() % 4)]  // fld1 fldpi fldln2 fldz
            var b: [UInt8] = storeLow(x, disp: 0xE0)
            b += [0xD9, constant, 0xDD, 0x44, 0x24, 0xE0, 0xDF, 0xF1]  // fld const; fld m64; fcomip st(1)
            b += [0xD9, 0xFA, 0xDD, 0x5C, 0x24, 0xD8]  // fsqrt (the constant); fstp m64
            b += [0xD9, 0x7C, 0x24, 0xC8, 0xDF, 0xE0]  // fnstcw; fnstsw ax
            return GeneratedInstruction(bytes: b, definesFlags: true)
        default:  // MOVAPS/MOVDQA register moves and PXOR self (zeroing idiom)
            if g.next() & 1 == 0 { return GeneratedInstruction(bytes: encode(0x66, 0xEF, reg: x, rm: x), definesFlags: nil) }
            return GeneratedInstruction(bytes: encode(0x66, 0x6F, reg: x, rm: y), definesFlags: nil)
        }
    }

    static func sequence(seed: UInt64, length: Int) -> VectorCase {
        var g = SplitMix64(seed: seed)
        var c = VectorCase()
        c.initial = (0..<16).map { _ in SequenceGenerator.value(&g) }
        c.xmm = (0..<32).map { _ in lane(&g) }
        c.flags = g.next() & (CF | PF | ZF | SF | OF)
        c.code = (0..<length).map { _ in instruction(&g) }
        return c
    }
}

extension VectorSequenceGenerator {
    /// `movq [rsp + disp8], xmm`.
    static func storeLow(_ reg: Int, disp: UInt8) -> [UInt8] {
        let modrm = 0x44 | UInt8((reg & 7) << 3)
        return reg >= 8 ? [0x66, 0x44, 0x0F, 0xD6, modrm, 0x24, disp] : [0x66, 0x0F, 0xD6, modrm, 0x24, disp]
    }
}

/// One sequence with its initial XMM/GPR state; `run` returns what the comparison looks at.
struct VectorCase: GeneratedCase {
    var code: [GeneratedInstruction] = []
    var initial: [UInt64] = []
    var xmm: [UInt64] = []
    var flags: UInt64 = 0

    struct Outcome: GeneratedOutcome {
        var gprs: [UInt64], rip: UInt64, rflags: UInt64, xmm: [UInt8], mxcsr: UInt32, stack: [UInt8]
        /// The sequence ran to its final `ud2` (no exception on the way).
        var completed: Bool
        var description: String {
            "rip=\(String(rip, radix: 16)) rflags=\(String(rflags, radix: 16)) mxcsr=\(String(mxcsr, radix: 16)) gprs=\(gprs.map { String($0, radix: 16) })"
        }
    }

    /// Where the XMM registers are loaded from and stored to, and MXCSR stored.
    static let xmmIn: UInt64 = 0x30_0000, xmmOut: UInt64 = 0x30_0100, mxcsrOut: UInt64 = 0x30_0200

    /// `movdqu xmm, [abs32]` (load) or `movdqu [abs32], xmm` (store).
    static func absoluteMove(_ reg: Int, _ address: UInt64, store: Bool) -> [UInt8] {
        var b: [UInt8] = [0xF3]
        if reg >= 8 { b.append(0x44) }
        b += [0x0F, store ? 0x7F : 0x6F, 0x04 | UInt8((reg & 7) << 3), 0x25]
        b += withUnsafeBytes(of: UInt32(address).littleEndian) { Array($0) }
        return b
    }

    /// Runs at CPL3 then `ud2` (no IDT: the VM shuts down there). The guest loads its XMM
    /// registers from memory and stores them and MXCSR back at the end, so nothing depends
    /// on KVM_SET_FPU/KVM_GET_FPU (which this host's KVM does not apply faithfully).
    func run(on engine: any Engine) throws -> Outcome {
        var program: [UInt8] = []
        for r in 0..<16 { program += Self.absoluteMove(r, Self.xmmIn + UInt64(16 * r), store: false) }
        program += code.flatMap(\.bytes)
        for r in 0..<16 { program += Self.absoluteMove(r, Self.xmmOut + UInt64(16 * r), store: true) }
        program += [0x0F, 0xAE, 0x1C, 0x25] + withUnsafeBytes(of: UInt32(Self.mxcsrOut).littleEndian) { Array($0) }  // stmxcsr
        program += [0x0F, 0x0B]
        let s = try Snippet(program, engine: engine, user: true) { st in
            var g = initial
            g[4] = 0x70_0000
            st.gprs = g
            st.rflags = 0x2 | flags
        }
        try s.memory.write(xmm.flatMap { v in withUnsafeBytes(of: v.littleEndian) { Array($0) } }, at: Self.xmmIn)
        try s.memory.write([UInt8](repeating: 0x5A, count: 256), at: 0x70_0000 - 256)
        let exit = try s.run()
        #expect(exit == .shutdown)
        let st = try s.state
        return Outcome(gprs: st.gprs, rip: st.rip, rflags: st.rflags & (CF | PF | AF | ZF | SF | OF),
                       xmm: try s.memory.read(at: Self.xmmOut, count: 256), mxcsr: try s.memory.load(UInt32.self, at: Self.mxcsrOut),
                       stack: try s.memory.read(at: 0x70_0000 - 256, count: 256),
                       completed: st.rip == Snippet.codeAddress + UInt64(program.count - 2))
    }
}

@Suite(.requiresKVM("needs /dev/kvm: CPL3 code runs natively there, so it is the reference CPU"))
struct SSERandomSequenceTests {
    @Test func softwareEngineMatchesTheRealCPUOnVectorCode() throws {
        let r = try RealCPUComparison(seeds: 1...200) { VectorSequenceGenerator.sequence(seed: $0, length: 10) }
        // The generator makes valid code: nearly every sequence runs to its end on the real CPU.
        #expect(r.completed >= 190, "only \(r.completed) of 200 sequences ran to the end")
        #expect(r.mismatches.isEmpty, "\(r.mismatches.count) sequences differ:\n\(r.mismatches.prefix(8).joined(separator: "\n"))")
    }
}
