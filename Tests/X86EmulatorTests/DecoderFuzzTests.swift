import TestSupport
import Testing
import VirtCore
@testable import X86Emulator

/// The fields of a decoded instruction the executor reads (not the cache's tag and generation).
private struct DecodedInstruction: Equatable, CustomStringConvertible {
    var op: UInt16, length: UInt8, pfx: UInt8, rep: UInt8, seg: UInt8, osize: UInt8
    var modrm: UInt8, reg: UInt8, rm: UInt8, base: UInt8, index: UInt8, scale: UInt8
    var disp: UInt64, imm: UInt64, imm2: UInt16

    init(_ e: Instr) {
        op = e.op; length = e.length; pfx = e.pfx; rep = e.rep; seg = e.seg; osize = e.osize
        modrm = e.modrm; reg = e.reg; rm = e.rm; base = e.base; index = e.index; scale = e.scale
        disp = e.disp; imm = e.imm; imm2 = e.imm2
    }

    var description: String { "op 0x\(String(op, radix: 16)) length \(length)" }
}

/// What the decoder made of a window: an instruction, or the fault it raised.
private enum DecodeOutcome: Equatable, CustomStringConvertible {
    case decoded(DecodedInstruction)
    case fault(String)

    var description: String {
        switch self {
        case let .decoded(i): return "\(i)"
        case let .fault(f): return f
        }
    }
}

/// Seeded fuzzing of the x86 decoder with structure-aware mutations of valid encodings:
/// the decoder must be a pure function of the bytes it consumes, consume 1…15 of them,
/// and raise only #UD, #GP or the fetch fault of the bytes it could not get.
@Suite struct DecoderFuzzTests {
    /// Valid encodings of each decoder path: prefixes, REX, the 0F map, ModRM with SIB,
    /// RIP-relative and absolute memory, every immediate kind, LOCK on a memory destination.
    static let corpus: [[UInt8]] = [
        [0x90],
        [0x48, 0x89, 0xD8],                                        // mov rax, rbx
        [0x48, 0x8B, 0x04, 0x25, 0x00, 0x10, 0x00, 0x00],          // mov rax, [0x1000]
        [0x48, 0x8D, 0x05, 0x10, 0x00, 0x00, 0x00],                // lea rax, [rip+0x10]
        [0x48, 0xB8, 1, 2, 3, 4, 5, 6, 7, 8],                      // mov rax, imm64
        [0x66, 0x41, 0x81, 0x44, 0x24, 0x08, 0x34, 0x12],          // add word [r12+8], 0x1234
        [0xF0, 0x48, 0x0F, 0xB1, 0x0E],                            // lock cmpxchg [rsi], rcx
        [0xF3, 0x48, 0xAB],                                        // rep stosq
        [0x0F, 0xA2],                                              // cpuid
        [0xC8, 0x10, 0x00, 0x01],                                  // enter 16, 1
        [0x0F, 0x84, 0x00, 0x01, 0x00, 0x00],                      // je rel32
        [0xE8, 0xFB, 0xFF, 0xFF, 0xFF],                            // call rel32
        [0x64, 0x48, 0x8B, 0x04, 0x25, 0x28, 0x00, 0x00, 0x00],    // mov rax, fs:[0x28]
        [0xF6, 0x04, 0x24, 0x01],                                  // test byte [rsp], 1
        [0x67, 0x8B, 0x00],                                        // mov eax, [eax]
        [0x48, 0xA1, 0, 0, 0, 0, 1, 0, 0, 0],                      // mov rax, moffs64
        [0x0F, 0xBA, 0x2C, 0x24, 0x05],                            // bts dword [rsp], 5
        [0x48, 0x69, 0xC0, 0x78, 0x56, 0x34, 0x12],                // imul rax, rax, imm32
        [0x44, 0x0F, 0xB6, 0x84, 0xC8, 0x00, 0x01, 0x00, 0x00],    // movzx r8d, byte [rax+rcx*8+0x100]
        [0x0F, 0x22, 0xD8],                                        // mov cr3, rax
        [0xC2, 0x08, 0x00],                                        // ret 8
    ]
    static let prefixes: [UInt8] = [0x66, 0x67, 0xF0, 0xF2, 0xF3, 0x64, 0x65, 0x26, 0x2E, 0x36, 0x3E, 0x40, 0x41, 0x44, 0x48, 0x4F]
    /// The fault a fetch beyond the window raises, as from an unmapped second page.
    static let nextPageFault = Fault.exception(vector: 14, errorCode: 0x10)

    private func decode(_ cpu: CPU, _ bytes: ArraySlice<UInt8>, nextPage: Fault? = nil) -> DecodeOutcome {
        var w = FetchWindow()
        let n = min(bytes.count, 15)
        withUnsafeMutableBytes(of: &w.bytes) { window in
            for (i, b) in bytes.prefix(n).enumerated() { window[i] = b }
        }
        w.available = n
        w.secondPageFault = nextPage
        var e = Instr()
        do throws(Fault) {
            try cpu.decode(w, into: &e)
            return .decoded(DecodedInstruction(e))
        } catch {
            return .fault("\(error)")
        }
    }

    /// Each corpus entry decodes, to its own length.
    @Test func corpusEncodingsAreValid() throws {
        let s = try Snippet([0x90], engine: SoftwareEngine())
        let cpu = try #require(s.vcpu as? SoftwareVirtualCPU).cpu
        for bytes in Self.corpus {
            guard case let .decoded(i) = decode(cpu, bytes[...]) else {
                Issue.record("corpus entry \(bytes) does not decode")
                continue
            }
            #expect(Int(i.length) == bytes.count, "\(bytes)")
        }
    }

    @Test func mutatedEncodingsDecodeConsistentlyOrFault() throws {
        let s = try Snippet([0x90], engine: SoftwareEngine())
        let cpu = try #require(s.vcpu as? SoftwareVirtualCPU).cpu
        let seed = FuzzBudget.seed(0xDEC0DE)
        var g = SplitMix64(seed: seed)
        var decoded = 0, faulted = 0
        for iteration in 0..<FuzzBudget.iterations(standard: 4000) {
            var bytes = Self.corpus[Int(g.next() % UInt64(Self.corpus.count))]
            for _ in 0..<1 + Int(g.next() % 3) {
                if g.next() % 4 == 0 {
                    bytes.insert(Self.prefixes[Int(g.next() % UInt64(Self.prefixes.count))], at: Int(g.next() % UInt64(bytes.count + 1)))
                } else {
                    Mutation.random(&g).apply(to: &bytes, &g)
                }
            }
            // A full window: whatever follows the instruction in memory is random.
            while bytes.count < 15 { bytes.append(UInt8(truncatingIfNeeded: g.next())) }
            let context = "seed \(seed) iteration \(iteration): \(bytes.prefix(15).map { String($0, radix: 16) })"

            let outcome = decode(cpu, bytes[...])
            #expect(decode(cpu, bytes[...]) == outcome, "re-decoding differs, \(context)")
            guard case let .decoded(instruction) = outcome else {
                faulted += 1
                #expect(outcome == .fault("\(Fault.ud)") || outcome == .fault("\(Fault.gp())"), "\(outcome), \(context)")
                continue
            }
            decoded += 1
            let length = Int(instruction.length)
            try #require((1...15).contains(length), "\(outcome), \(context)")
            // Only the instruction's own bytes matter: other bytes after it change nothing…
            var other = Array(bytes[0..<length])
            while other.count < 15 { other.append(UInt8(truncatingIfNeeded: g.next())) }
            #expect(decode(cpu, other[...]) == outcome, "bytes after the instruction changed it, \(context)")
            // …and every shorter window needs the missing byte, so raises the fetch fault for it.
            for k in 0..<length {
                #expect(decode(cpu, bytes[0..<k], nextPage: Self.nextPageFault) == .fault("\(Self.nextPageFault)"),
                        "window of \(k) of \(length) bytes, \(context)")
            }
        }
        #expect(decoded > 0 && faulted > 0, "decoded \(decoded), faulted \(faulted)")
    }
}
