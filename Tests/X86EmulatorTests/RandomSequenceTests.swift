import Foundation
import KVMEngine
import TestSupport
import Testing
import VirtCore
@testable import X86Emulator

/// One generated instruction and what it does to the flags the comparison can rely on.
struct GeneratedInstruction {
    var bytes: [UInt8]
    /// nil: leaves flags as they were; true: defines CF, ZF, SF, PF; false: leaves some undefined.
    var definesFlags: Bool?
    /// Reads CF or ZF (so may only follow a defining instruction).
    var consumesFlags = false
}

/// Random integer instruction sequences over general-purpose registers (never RSP).
enum SequenceGenerator {
    static let registers = [0, 1, 2, 3, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]
    static let boundaryValues: [UInt64] = [0, 1, 2, 0x7F, 0x80, 0xFF, 0x7FFF, 0x8000, 0xFFFF, 0x7FFF_FFFF, 0x8000_0000,
                                           0xFFFF_FFFF, 0x1_0000_0000, UInt64(Int64.max), 1 << 63, ~0, ~1]

    static func value(_ g: inout SplitMix64) -> UInt64 {
        g.next() % 3 == 0 ? g.next() : boundaryValues[Int(g.next() % UInt64(boundaryValues.count))]
    }

    static func instruction(_ g: inout SplitMix64, flagsDefined: Bool) -> GeneratedInstruction {
        let dst = registers[Int(g.next() % UInt64(registers.count))]
        let src = registers[Int(g.next() % UInt64(registers.count))]
        let w = g.next() & 1 == 0
        // A quarter of the 32-bit forms become 16-bit ones (operand-size prefix).
        let o16: [UInt8] = !w && g.next() % 4 == 0 ? [0x66] : []
        let rexB = Asm.rex(w: w, b: dst)
        switch g.next() % (flagsDefined ? 18 : 14) {
        case 11, 12:  // memory operands on the stack page below RSP (the translator's inline TLB path)
            return memoryInstruction(&g, reg: src, w: w, o16: o16)
        case 13:  // DIV/IDIV: often prepared (XOR EDX / CQO first), sometimes not, so #DE happens too
            let ext: UInt8 = g.next() & 1 == 0 ? 6 : 7
            let prepare: [UInt8]
            switch g.next() % 3 {
            case 0: prepare = ext == 6 ? [0x31, 0xD2] : (w ? [0x48, 0x99] : o16 + [0x99])  // xor edx,edx / cqo, cdq, cwd
            case 1: prepare = []
            default: prepare = ext == 6 ? [0x31, 0xD2] : (w ? [0x48, 0x99] : o16 + [0x99])
            }
            return GeneratedInstruction(bytes: prepare + o16 + [rexB, 0xF7, 0xC0 | ext << 3 | UInt8(dst & 7)], definesFlags: false)
        case 0, 1:  // ALU r/m, r
            let ops: [UInt8] = [0x01, 0x09, 0x21, 0x29, 0x31, 0x39, 0x85]
            return GeneratedInstruction(bytes: o16 + Asm.rr(ops[Int(g.next() % 7)], dst: dst, src: src, w: w), definesFlags: true)
        case 2:  // ALU r/m, imm8
            let op = Int(g.next() % 8)
            guard op != 2 && op != 3 else { fallthrough }  // ADC/SBB read CF: handled below
            return GeneratedInstruction(bytes: [rexB, 0x83, 0xC0 | UInt8(op << 3) | UInt8(dst & 7), UInt8(truncatingIfNeeded: g.next())], definesFlags: true)
        case 3:  // INC/DEC (CF kept), NEG, NOT
            switch g.next() % 4 {
            case 0: return GeneratedInstruction(bytes: [rexB, 0xFF, 0xC0 | UInt8(dst & 7)], definesFlags: flagsDefined ? true : false)
            case 1: return GeneratedInstruction(bytes: [rexB, 0xFF, 0xC8 | UInt8(dst & 7)], definesFlags: flagsDefined ? true : false)
            case 2: return GeneratedInstruction(bytes: [rexB, 0xF7, 0xD8 | UInt8(dst & 7)], definesFlags: true)
            default: return GeneratedInstruction(bytes: [rexB, 0xF7, 0xD0 | UInt8(dst & 7)], definesFlags: nil)
            }
        case 4:  // shifts and rotates by an immediate (count masked like the CPU does)
            let kind = [0, 1, 4, 5, 7][Int(g.next() % 5)]
            let width: UInt64 = w ? 64 : 32
            let counts: [UInt64] = [0, 1, width - 1, g.next() % width]
            let count = counts[Int(g.next() % 4)]
            // OF is undefined for counts above 1 and rotates leave ZF/SF/PF alone.
            let defines: Bool? = count == 0 ? nil : (kind <= 1 ? false : true)
            return GeneratedInstruction(bytes: [rexB, 0xC1, 0xC0 | UInt8(kind << 3) | UInt8(dst & 7), UInt8(count)], definesFlags: defines)
        case 5:  // MOVZX/MOVSX from a byte or word register
            let op: UInt8 = [0xB6, 0xB7, 0xBE, 0xBF][Int(g.next() % 4)]
            return GeneratedInstruction(bytes: [Asm.rex(w: w, r: dst, b: src), 0x0F, op, Asm.modrm(dst, src)], definesFlags: nil)
        case 6:  // IMUL r, r/m (SF/ZF/PF undefined)
            return GeneratedInstruction(bytes: [Asm.rex(w: w, r: dst, b: src), 0x0F, 0xAF, Asm.modrm(dst, src)], definesFlags: false)
        case 7:  // BSWAP, XCHG, MOV imm
            switch g.next() % 3 {
            case 0: return GeneratedInstruction(bytes: [rexB, 0x0F, 0xC8 | UInt8(dst & 7)], definesFlags: nil)
            case 1: return GeneratedInstruction(bytes: Asm.rr(0x87, dst: dst, src: src, w: w), definesFlags: nil)
            default: return GeneratedInstruction(bytes: Asm.movImm64(dst, value(&g)), definesFlags: nil)
            }
        case 8:  // LEA dst, [src + dst*scale + disp8]
            let sib = UInt8(Int(g.next() % 4) << 6) | UInt8((dst & 7) << 3) | UInt8(src & 7)
            guard dst != 4, src & 7 != 5 else { fallthrough }
            return GeneratedInstruction(bytes: [0x48 | UInt8((dst >> 3) << 2) | UInt8((dst >> 3) << 1) | UInt8(src >> 3), 0x8D,
                                                0x44 | UInt8((dst & 7) << 3), sib, UInt8(truncatingIfNeeded: g.next())], definesFlags: nil)
        case 9:  // POPCNT (all flags defined), TZCNT/LZCNT (CF, ZF defined; others undefined)
            let op: UInt8 = [0xB8, 0xBC, 0xBD][Int(g.next() % 3)]
            return GeneratedInstruction(bytes: [0xF3, Asm.rex(w: w, r: dst, b: src), 0x0F, op, Asm.modrm(dst, src)],
                                        definesFlags: op == 0xB8 ? true : false)
        case 10:  // MUL/IMUL one-operand (RDX:RAX; SF/ZF/PF undefined)
            return GeneratedInstruction(bytes: [rexB, 0xF7, (g.next() & 1 == 0 ? 0xE0 : 0xE8) | UInt8(dst & 7)], definesFlags: false)
        case 14:  // SETcc / CMOVcc on CF and ZF conditions (B, AE, E, NE, BE, A)
            let cc = UInt8([2, 3, 4, 5, 6, 7][Int(g.next() % 6)])
            if g.next() & 1 == 0 {
                return GeneratedInstruction(bytes: [Asm.rex(w: false, b: dst), 0x0F, 0x90 | cc, Asm.modrm(0, dst)], definesFlags: nil, consumesFlags: true)
            }
            return GeneratedInstruction(bytes: [Asm.rex(w: w, r: dst, b: src), 0x0F, 0x40 | cc, Asm.modrm(dst, src)], definesFlags: nil, consumesFlags: true)
        case 15:  // RCL/RCR by 1 (CF and OF defined; reads CF)
            return GeneratedInstruction(bytes: [rexB, 0xD1, (g.next() & 1 == 0 ? 0xD0 : 0xD8) | UInt8(dst & 7)], definesFlags: false, consumesFlags: true)
        default:  // ADC/SBB
            return GeneratedInstruction(bytes: o16 + Asm.rr(g.next() & 1 == 0 ? 0x11 : 0x19, dst: dst, src: src, w: w), definesFlags: true, consumesFlags: true)
        }
    }

    /// `op [rsp-disp], reg`, `op reg, [rsp-disp]`, MOV either way, or PUSH then POP, at
    /// byte offsets that are not always aligned.
    static func memoryInstruction(_ g: inout SplitMix64, reg: Int, w: Bool, o16: [UInt8]) -> GeneratedInstruction {
        let disp = UInt8(bitPattern: -Int8(1 + Int(g.next() % 100)))
        let mem: [UInt8] = [0x44 | UInt8((reg & 7) << 3), 0x24, disp]  // [rsp + disp8]
        let rex = rex(w: w, r: reg)
        switch g.next() % 5 {
        case 0:  // ALU r/m, r (stores unless CMP)
            let op: UInt8 = [0x01, 0x09, 0x21, 0x29, 0x31, 0x39][Int(g.next() % 6)]
            return GeneratedInstruction(bytes: o16 + [rex, op] + mem, definesFlags: true)
        case 1:  // ALU r, r/m
            let op: UInt8 = [0x03, 0x0B, 0x23, 0x2B, 0x33, 0x3B, 0x85][Int(g.next() % 7)]
            return GeneratedInstruction(bytes: o16 + [rex, op] + mem, definesFlags: true)
        case 2:  // MOV store (byte or full size)
            let byte = g.next() & 1 == 0
            return GeneratedInstruction(bytes: (byte ? [] : o16) + [byte ? rex | 0x40 : rex, byte ? 0x88 : 0x89] + mem, definesFlags: nil)
        case 3:  // MOV load / MOVZX byte load
            if g.next() & 1 == 0 { return GeneratedInstruction(bytes: o16 + [rex, 0x8B] + mem, definesFlags: nil) }
            return GeneratedInstruction(bytes: [rex, 0x0F, 0xB6] + mem, definesFlags: nil)
        default:  // PUSH reg; POP another
            let other = registers[Int(g.next() % UInt64(registers.count))]
            return GeneratedInstruction(bytes: [reg >= 8 ? 0x41 : 0x40, 0x50 + UInt8(reg & 7),
                                                other >= 8 ? 0x41 : 0x40, 0x58 + UInt8(other & 7)], definesFlags: nil)
        }
    }

    private static func rex(w: Bool, r: Int) -> UInt8 { 0x40 | (w ? 8 : 0) | UInt8((r >> 3) << 2) }

    static func sequence(seed: UInt64, length: Int) -> (initial: [UInt64], flags: UInt64, code: [GeneratedInstruction]) {
        var g = SplitMix64(seed: seed)
        let initial = (0..<16).map { _ in value(&g) }
        let flags = g.next() & (CF | PF | ZF | SF | OF)
        var defined = true
        var code: [GeneratedInstruction] = []
        for _ in 0..<length {
            let i = instruction(&g, flagsDefined: defined)
            if let d = i.definesFlags { defined = d }
            code.append(i)
        }
        return (initial, flags, code)
    }
}

/// Runs a sequence at CPL3 then `ud2` (no IDT: the VM shuts down there) and returns the
/// general-purpose registers, RIP and RFLAGS.
func runSequence(_ code: [GeneratedInstruction], initial: [UInt64], flags: UInt64, on engine: any Engine) throws -> ([UInt64], UInt64, UInt64) {
    let s = try Snippet(code.flatMap(\.bytes) + [0x0F, 0x0B], engine: engine, user: true) { st in
        var g = initial
        g[4] = 0x70_0000
        st.gprs = g
        st.rflags = 0x2 | flags
    }
    let exit = try s.run()
    #expect(exit == .shutdown)
    let st = try s.state
    return (st.gprs, st.rip, st.rflags)
}

@Suite(.requiresKVM("needs /dev/kvm: CPL3 code runs natively there, so it is the reference CPU"))
struct RandomSequenceTests {
    /// Both ways the software engine runs code: interpreted, and translated.
    @Test func softwareEngineMatchesTheRealCPU() throws {
        let kvm = try KVMEngine()
        var mismatches: [String] = []
        for seed in UInt64(1)...300 {
            let (initial, flags, code) = SequenceGenerator.sequence(seed: seed, length: 12)
            if try !agrees(code, initial, flags, kvm) {
                let reproducer = try shrink(code, initial, flags, kvm)
                try RegressionCorpus.append(reproducer)
                mismatches.append("seed \(seed): \(reproducer.line)")
            }
        }
        #expect(mismatches.isEmpty, """
            \(mismatches.count) sequences differ; their smallest reproducers were added to \
            \(RegressionCorpus.url.lastPathComponent) (commit them with the fix):
            \(mismatches.prefix(10).joined(separator: "\n"))
            """)
    }

    func agrees(_ code: [GeneratedInstruction], _ initial: [UInt64], _ flags: UInt64, _ kvm: KVMEngine) throws -> Bool {
        let expected = try RegressionCase.record(code, initial, flags, reference: kvm)
        return try expected.holds(on: SoftwareEngine(translation: false)) && expected.holds(on: SoftwareEngine(translation: true))
    }

    /// Drops instructions while the disagreement persists; returns the case left, with the
    /// real CPU's results as its expectation.
    func shrink(_ code: [GeneratedInstruction], _ initial: [UInt64], _ flags: UInt64, _ kvm: KVMEngine) throws -> RegressionCase {
        var current = code
        var i = 0
        while i < current.count {
            var candidate = current
            candidate.remove(at: i)
            if (try? agrees(candidate, initial, flags, kvm)) == false { current = candidate } else { i += 1 }
        }
        return try RegressionCase.record(current, initial, flags, reference: kvm)
    }
}

/// A shrunk disagreement between the interpreter and the real CPU, with the real CPU's
/// results, so it keeps being checked on machines without /dev/kvm. One line of
/// `RandomSequenceRegressions.txt` each.
struct RegressionCase: CustomStringConvertible {
    var code: [[UInt8]]
    var initial: [UInt64]
    var flags: UInt64
    var gprs: [UInt64]
    var rip: UInt64
    var rflags: UInt64
    /// The RFLAGS bits the sequence defines (undefined ones are not compared).
    var flagMask: UInt64

    static func record(_ code: [GeneratedInstruction], _ initial: [UInt64], _ flags: UInt64, reference: any Engine) throws -> RegressionCase {
        let (gprs, rip, rflags) = try runSequence(code, initial: initial, flags: flags, on: reference)
        // Only instructions that ran define the flags: an exception (#DE) stops the sequence
        // at the faulting instruction.
        var defined = true
        var end = Snippet.codeAddress
        for i in code {
            end += UInt64(i.bytes.count)
            if end > rip { break }
            if let d = i.definesFlags { defined = d }
        }
        return RegressionCase(code: code.map(\.bytes), initial: initial, flags: flags, gprs: gprs, rip: rip,
                              rflags: rflags, flagMask: defined ? CF | ZF | SF | PF : 0)
    }

    func holds(on engine: any Engine) throws -> Bool {
        let code = self.code.map { GeneratedInstruction(bytes: $0, definesFlags: nil) }
        let (g, r, f) = try runSequence(code, initial: initial, flags: flags, on: engine)
        return g == gprs && r == rip && f & flagMask == rflags & flagMask
    }

    private static func hex(_ v: [UInt64]) -> String { v.map { String($0, radix: 16) }.joined(separator: ",") }
    private static func values(_ s: Substring) -> [UInt64]? {
        let v = s.split(separator: ",").compactMap { UInt64($0, radix: 16) }
        return v.count == 16 ? v : nil
    }

    /// `code=48 11 c8|66 d1 d0 regs=… flags=… expect-regs=… expect-rip=… expect-flags=… mask=…`
    var line: String {
        "code=" + code.map { $0.map { String($0, radix: 16) }.joined(separator: " ") }.joined(separator: "|")
            + " regs=\(Self.hex(initial)) flags=\(String(flags, radix: 16)) expect-regs=\(Self.hex(gprs))"
            + " expect-rip=\(String(rip, radix: 16)) expect-flags=\(String(rflags, radix: 16)) mask=\(String(flagMask, radix: 16))"
    }
    var description: String { line }

    init(code: [[UInt8]], initial: [UInt64], flags: UInt64, gprs: [UInt64], rip: UInt64, rflags: UInt64, flagMask: UInt64) {
        (self.code, self.initial, self.flags, self.gprs, self.rip, self.rflags, self.flagMask) = (code, initial, flags, gprs, rip, rflags, flagMask)
    }

    init?(line: Substring) {
        guard let codeStart = line.range(of: "code="), let regsStart = line.range(of: " regs=") else { return nil }
        code = line[codeStart.upperBound..<regsStart.lowerBound].split(separator: "|").map {
            $0.split(separator: " ").compactMap { UInt8($0, radix: 16) }
        }
        var fields: [Substring: Substring] = [:]
        for f in line[line.index(after: regsStart.lowerBound)...].split(separator: " ") {
            guard let eq = f.firstIndex(of: "=") else { return nil }
            fields[f[..<eq]] = f[f.index(after: eq)...]
        }
        guard let i = fields["regs"].flatMap(Self.values), let g = fields["expect-regs"].flatMap(Self.values),
              let fl = fields["flags"].flatMap({ UInt64($0, radix: 16) }), let r = fields["expect-rip"].flatMap({ UInt64($0, radix: 16) }),
              let rf = fields["expect-flags"].flatMap({ UInt64($0, radix: 16) }), let m = fields["mask"].flatMap({ UInt64($0, radix: 16) })
        else { return nil }
        (initial, flags, gprs, rip, rflags, flagMask) = (i, fl, g, r, rf, m)
    }
}

/// The stored reproducers: failures found by the random comparison are appended here.
enum RegressionCorpus {
    static let url = URL(fileURLWithPath: #filePath).deletingLastPathComponent().appendingPathComponent("RandomSequenceRegressions.txt")

    static func load() throws -> [RegressionCase] {
        let text = try String(contentsOf: url, encoding: .utf8)
        return try text.split(separator: "\n").filter { !$0.hasPrefix("#") && !$0.isEmpty }.map { line in
            guard let c = RegressionCase(line: line) else { throw CorpusError(line: String(line)) }
            return c
        }
    }

    static func append(_ c: RegressionCase) throws {
        let handle = try FileHandle(forWritingTo: url)
        defer { try? handle.close() }
        try handle.seekToEnd()
        try handle.write(contentsOf: Data((c.line + "\n").utf8))
    }

    struct CorpusError: Error, CustomStringConvertible {
        var line: String
        var description: String { "unreadable line in \(RegressionCorpus.url.lastPathComponent): \(line)" }
    }
}

/// The stored reproducers need no /dev/kvm: their expectations came from the real CPU.
@Suite struct RandomSequenceRegressionTests {
    @Test func storedReproducersStillAgreeWithTheRealCPU() throws {
        let cases = try RegressionCorpus.load()
        #expect(!cases.isEmpty)
        for c in cases {
            #expect(try c.holds(on: SoftwareEngine(translation: false)), "interpreted: \(c)")
            #expect(try c.holds(on: SoftwareEngine(translation: true)), "translated: \(c)")
        }
    }

    @Test func aWrongExpectationIsCaught() throws {
        var c = try #require(try RegressionCorpus.load().first)
        c.gprs[0] ^= 1
        #expect(try !c.holds(on: SoftwareEngine()))
    }

    @Test func corpusLinesRoundTrip() throws {
        for c in try RegressionCorpus.load() {
            let again = try #require(RegressionCase(line: Substring(c.line)))
            #expect(again.line == c.line)
        }
    }
}
