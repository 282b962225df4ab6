import KVMEngine
import TestSupport
import Testing
import VirtCore
@testable import X86Emulator

/// Random MMX instruction sequences (with x87 loads and stores between them, and EMMS),
/// run at CPL3 on the real CPU (KVM) and on the software engine, interpreted and
/// translated; the MMX registers, general-purpose registers, flags, the stack page and
/// the FXSAVE image's x87 part (control, status and tag words, the eight register slots)
/// are compared.
enum MMXSequenceGenerator {
    /// Register-register (and, with memory, register-memory) MMX operations.
    static let binary: [UInt8] = Array(0x60...0x6B) + [0x6F, 0x74, 0x75, 0x76, 0xD1, 0xD2, 0xD3, 0xD4, 0xD5]
        + Array(0xD8...0xDF) + Array(0xE0...0xE5) + Array(0xE8...0xEF) + Array(0xF1...0xF6) + Array(0xF8...0xFE)

    static func encode(_ opcode: UInt8, reg: Int, rm: Int, w: Bool = false, memory: [UInt8]? = nil) -> [UInt8] {
        let rex = UInt8(0x40) | (w ? 8 : 0) | UInt8((reg >> 3) << 2) | (memory == nil ? UInt8(rm >> 3) : 0)
        var bytes: [UInt8] = rex != 0x40 ? [rex] : []
        bytes += [0x0F, opcode]
        if let memory { bytes.append(0x44 | UInt8((reg & 7) << 3)); bytes += memory } else { bytes.append(0xC0 | UInt8((reg & 7) << 3) | UInt8(rm & 7)) }
        return bytes
    }

    /// `[rsp + disp8]` below RSP, any alignment (MMX memory operands need none).
    static func stackOperand(_ g: inout SplitMix64) -> [UInt8] { [0x24, UInt8(bitPattern: Int8(-Int(8 + g.next() % 100)))] }

    static func instruction(_ g: inout SplitMix64) -> GeneratedInstruction {
        let x = Int(g.next() % 8), y = Int(g.next() % 8)
        let gp = SequenceGenerator.registers[Int(g.next() % UInt64(SequenceGenerator.registers.count))]
        let w = g.next() & 1 == 0
        switch g.next() % 16 {
        case 0...6:
            return GeneratedInstruction(bytes: encode(binary[Int(g.next() % UInt64(binary.count))], reg: x, rm: y), definesFlags: nil)
        case 7:  // PSHUFW
            return GeneratedInstruction(bytes: encode(0x70, reg: x, rm: y) + [UInt8(truncatingIfNeeded: g.next())], definesFlags: nil)
        case 8:  // shifts by an immediate
            let (op, ext): (UInt8, Int) = [(0x71, 2), (0x71, 4), (0x71, 6), (0x72, 2), (0x72, 4), (0x72, 6), (0x73, 2), (0x73, 6)][Int(g.next() % 8)]
            let counts: [UInt8] = [0, 1, 7, 8, 15, 16, 31, 32, 63, 64, 200]
            return GeneratedInstruction(bytes: encode(op, reg: ext, rm: x) + [counts[Int(g.next() % UInt64(counts.count))]], definesFlags: nil)
        case 9:  // MOVD/MOVQ to and from general-purpose registers
            return GeneratedInstruction(bytes: encode(g.next() & 1 == 0 ? 0x6E : 0x7E, reg: x, rm: gp, w: w), definesFlags: nil)
        case 10:  // PINSRW, PEXTRW, PMOVMSKB (any imm8: only its low bits select)
            switch g.next() % 3 {
            case 0: return GeneratedInstruction(bytes: encode(0xC4, reg: x, rm: gp) + [UInt8(truncatingIfNeeded: g.next())], definesFlags: nil)
            case 1: return GeneratedInstruction(bytes: encode(0xC5, reg: gp, rm: x) + [UInt8(truncatingIfNeeded: g.next())], definesFlags: nil)
            default: return GeneratedInstruction(bytes: encode(0xD7, reg: gp, rm: x), definesFlags: nil)
            }
        case 11:  // memory operands: loads, stores, MOVNTQ, arithmetic, MOVD to/from memory
            let op: UInt8 = [0x6F, 0x7F, 0xE7, 0xFE, 0xEF, 0x63, 0x6A, 0xF5, 0x6E, 0x7E][Int(g.next() % 10)]
            return GeneratedInstruction(bytes: encode(op, reg: x, rm: 0, w: w && (op == 0x6E || op == 0x7E), memory: stackOperand(&g)),
                                        definesFlags: nil)
        case 12:  // EMMS
            return GeneratedInstruction(bytes: [0x0F, 0x77], definesFlags: nil)
        case 13:  // x87 over the MMX registers: fld m64 (overflows while they are valid); fstp m64
            let disp = UInt8(bitPattern: Int8(-Int(8 * (1 + g.next() % 12))))
            return GeneratedInstruction(bytes: [0xDD, 0x44, 0x24, disp, 0xDD, 0x5C, 0x24, 0xD0], definesFlags: nil)
        default:  // register moves
            return GeneratedInstruction(bytes: encode(g.next() & 1 == 0 ? 0x6F : 0x7F, reg: x, rm: y), definesFlags: nil)
        }
    }

    static func sequence(seed: UInt64, length: Int) -> MMXCase {
        var g = SplitMix64(seed: seed)
        var c = MMXCase()
        c.initial = (0..<16).map { _ in SequenceGenerator.value(&g) }
        c.mm = (0..<8).map { _ in VectorSequenceGenerator.lane(&g) }
        c.flags = g.next() & (CF | PF | ZF | SF | OF)
        c.code = (0..<length).map { _ in instruction(&g) }
        return c
    }
}

struct MMXCase: GeneratedCase {
    var code: [GeneratedInstruction] = []
    var initial: [UInt64] = []
    var mm: [UInt64] = []
    var flags: UInt64 = 0

    struct Outcome: GeneratedOutcome {
        var gprs: [UInt64], rip: UInt64, rflags: UInt64, mm: [UInt8], x87: [UInt8], stack: [UInt8]
        var completed: Bool
        var description: String {
            "rip=\(String(rip, radix: 16)) rflags=\(String(rflags, radix: 16)) fcw/fsw/ftw=\(x87.prefix(5).map { String($0, radix: 16) }) "
                + "gprs=\(gprs.map { String($0, radix: 16) })"
        }
    }

    static let mmIn: UInt64 = 0x30_0000, mmOut: UInt64 = 0x30_0100, fxsaveArea: UInt64 = 0x30_0200

    /// `movq mm, [abs32]` (load) or `movq [abs32], mm` (store).
    static func absoluteMove(_ reg: Int, _ address: UInt64, store: Bool) -> [UInt8] {
        [0x0F, store ? 0x7F : 0x6F, 0x04 | UInt8(reg << 3), 0x25] + withUnsafeBytes(of: UInt32(address).littleEndian) { Array($0) }
    }

    /// fninit; the MMX registers from memory; the sequence; the MMX registers and an FXSAVE
    /// image to memory; `ud2` (the VM shuts down there).
    func run(on engine: any Engine) throws -> Outcome {
        var program: [UInt8] = [0xDB, 0xE3]
        for r in 0..<8 { program += Self.absoluteMove(r, Self.mmIn + UInt64(8 * r), store: false) }
        program += code.flatMap(\.bytes)
        program += [0x0F, 0xAE, 0x04, 0x25] + withUnsafeBytes(of: UInt32(Self.fxsaveArea).littleEndian) { Array($0) }  // fxsave
        for r in 0..<8 { program += Self.absoluteMove(r, Self.mmOut + UInt64(8 * r), store: true) }
        program += [0x0F, 0x0B]
        let s = try Snippet(program, engine: engine, user: true) { st in
            var g = initial
            g[4] = 0x70_0000
            st.gprs = g
            st.rflags = 0x2 | flags
        }
        try s.memory.write(mm.flatMap { v in withUnsafeBytes(of: v.littleEndian) { Array($0) } }, at: Self.mmIn)
        try s.memory.write([UInt8](repeating: 0x5A, count: 256), at: 0x70_0000 - 256)
        let exit = try s.run()
        #expect(exit == .shutdown)
        let st = try s.state
        let image = try s.memory.read(at: Self.fxsaveArea, count: 160)
        // FCW, FSW, FTW and the register slots; FOP, FIP and FDP are the last x87 instruction's.
        let x87 = Array(image[0..<5]) + Array(image[32..<160])
        return Outcome(gprs: st.gprs, rip: st.rip, rflags: st.rflags & (CF | PF | AF | ZF | SF | OF),
                       mm: try s.memory.read(at: Self.mmOut, count: 64), x87: x87,
                       stack: try s.memory.read(at: 0x70_0000 - 256, count: 256),
                       completed: st.rip == Snippet.codeAddress + UInt64(program.count - 2))
    }
}

@Suite(.requiresKVM("needs /dev/kvm: CPL3 code runs natively there, so it is the reference CPU"))
struct MMXRandomSequenceTests {
    @Test func softwareEngineMatchesTheRealCPUOnMMXCode() throws {
        let r = try RealCPUComparison(seeds: 1...150) { MMXSequenceGenerator.sequence(seed: $0, length: 10) }
        #expect(r.completed >= 145, "only \(r.completed) of 150 sequences ran to the end")
        #expect(r.mismatches.isEmpty, "\(r.mismatches.count) sequences differ:\n\(r.mismatches.prefix(8).joined(separator: "\n"))")
    }
}
