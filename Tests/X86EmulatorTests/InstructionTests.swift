import Testing
import VirtCore
@testable import X86Emulator

/// Runs `code` then `hlt` at CPL0 on the software engine and returns the final state.
func execute(_ code: [UInt8], _ adjust: @escaping (inout VCPUState) -> Void = { _ in }) throws -> (VMExit, VCPUState) {
    let s = try Snippet(code + [0xF4], engine: SoftwareEngine(), state: adjust)
    let exit = try s.run()
    return (exit, try s.state)
}

let CF: UInt64 = 1, PF: UInt64 = 4, AF: UInt64 = 0x10, ZF: UInt64 = 0x40, SF: UInt64 = 0x80, OF: UInt64 = 0x800

@Suite struct ALUFlagTests {
    @Test func addAtTheSignedBoundary() throws {
        // mov al,0x7f; add al,1
        let (exit, s) = try execute([0xB0, 0x7F, 0x04, 0x01])
        #expect(exit == .halt)
        #expect(s.rax & 0xFF == 0x80)
        #expect(s.rflags & (CF | ZF | SF | OF | AF) == SF | OF | AF)
    }

    @Test func addCarryOutOfAllOnes() throws {
        // mov rax,-1; add rax,1
        let (_, s) = try execute(Asm.movImm64(0, ~0) + [0x48, 0x83, 0xC0, 0x01])
        #expect(s.rax == 0)
        #expect(s.rflags & (CF | ZF | SF | OF | PF) == CF | ZF | PF)
    }

    @Test func subBorrowAndSignedOverflow() throws {
        // mov eax,0x80000000; sub eax,1  → 0x7fffffff, OF set, no CF
        let (_, s) = try execute([0xB8, 0, 0, 0, 0x80, 0x83, 0xE8, 0x01])
        #expect(s.rax == 0x7FFF_FFFF)
        #expect(s.rflags & (CF | OF | SF) == OF)
        // xor eax,eax; sub eax,1 → borrow
        let (_, t) = try execute([0x31, 0xC0, 0x83, 0xE8, 0x01])
        #expect(t.rax == 0xFFFF_FFFF)
        #expect(t.rflags & (CF | SF | ZF) == CF | SF)
    }

    @Test func thirtyTwoBitResultsZeroExtend() throws {
        // mov rax,-1; mov eax,eax; mov rbx,-1; inc ebx
        let (_, s) = try execute(Asm.movImm64(0, ~0) + [0x89, 0xC0] + Asm.movImm64(3, ~0) + [0xFF, 0xC3])
        #expect(s.rax == 0xFFFF_FFFF)
        #expect(s.rbx == 0)
    }

    @Test func shiftByZeroLeavesFlags() throws {
        // stc; mov cl,0; shl eax,cl
        let (_, s) = try execute([0xF9, 0xB1, 0x00, 0xD3, 0xE0])
        #expect(s.rflags & CF == CF)
    }

    @Test func shiftsByOneAndWidthMinusOne() throws {
        // mov eax,0x80000001; shl eax,1 → CF=1 OF=1 (msb(result)=0 xor CF)
        let (_, s) = try execute([0xB8, 1, 0, 0, 0x80, 0xD1, 0xE0])
        #expect(s.rax == 2)
        #expect(s.rflags & (CF | OF) == CF | OF)
        // mov rax,-2; sar rax,63 → all ones, CF = bit 62 = 1
        let (_, t) = try execute(Asm.movImm64(0, ~1) + [0x48, 0xC1, 0xF8, 0x3F])
        #expect(t.rax == ~0)
        #expect(t.rflags & CF == CF)
    }

    @Test func divideByZeroRaisesDE() throws {
        // xor ecx,ecx; div ecx  (no IDT: #DE cannot be delivered → triple fault)
        let s = try Snippet([0x31, 0xC9, 0xF7, 0xF1, 0xF4], engine: SoftwareEngine())
        #expect(try s.run() == .shutdown)
        #expect(try s.state.rip == Snippet.codeAddress + 2)  // at the faulting div
        let v = try #require(s.vcpu as? SoftwareVirtualCPU)
        #expect(v.exceptionCount >= 1)
    }

    @Test func signedDivisionOverflowRaisesDE() throws {
        // mov rax,INT64_MIN; cqo; mov rcx,-1; idiv rcx
        let s = try Snippet(Asm.movImm64(0, 1 << 63) + [0x48, 0x99] + Asm.movImm64(1, ~0) + [0x48, 0xF7, 0xF9, 0xF4],
                            engine: SoftwareEngine())
        #expect(try s.run() == .shutdown)
    }

    @Test func signedDivisionByINT64MinAndOverflowingNarrowDivision() throws {
        // mov rax,INT64_MIN; cqo; mov rcx,INT64_MIN; idiv rcx → 1 r 0
        let (_, s) = try execute(Asm.movImm64(0, 1 << 63) + [0x48, 0x99] + Asm.movImm64(1, 1 << 63) + [0x48, 0xF7, 0xF9])
        #expect(s.rax == 1 && s.rdx == 0)
        // mov rax,5; cqo; mov rcx,INT64_MIN; idiv rcx → 0 r 5
        let (_, t) = try execute(Asm.movImm64(0, 5) + [0x48, 0x99] + Asm.movImm64(1, 1 << 63) + [0x48, 0xF7, 0xF9])
        #expect(t.rax == 0 && t.rdx == 5)
        // edx:eax = 0x80000000:00000000, idiv ecx=-1 → #DE (no IDT: shutdown), host intact
        let u = try Snippet([0xBA, 0, 0, 0, 0x80, 0x31, 0xC0, 0xB9, 0xFF, 0xFF, 0xFF, 0xFF, 0xF7, 0xF9, 0xF4], engine: SoftwareEngine())
        #expect(try u.run() == .shutdown)
        // 16-bit: dx:ax = 0x8000:0000 / -1 → #DE
        let w = try Snippet([0x66, 0xBA, 0, 0x80, 0x31, 0xC0, 0x66, 0xB9, 0xFF, 0xFF, 0x66, 0xF7, 0xF9, 0xF4], engine: SoftwareEngine())
        #expect(try w.run() == .shutdown)
    }

    @Test func divisionResults() throws {
        // mov eax,100; xor edx,edx; mov ecx,7; div ecx → 14 r 2 ; mov rax,-100; cqo; mov rbx,7; idiv rbx → -14 r -2
        let (_, s) = try execute([0xB8, 100, 0, 0, 0, 0x31, 0xD2, 0xB9, 7, 0, 0, 0, 0xF7, 0xF1])
        #expect(s.rax == 14 && s.rdx == 2)
        let (_, t) = try execute(Asm.movImm64(0, UInt64(bitPattern: -100)) + [0x48, 0x99] + Asm.movImm64(3, 7) + [0x48, 0xF7, 0xFB])
        #expect(Int64(bitPattern: t.rax) == -14 && Int64(bitPattern: t.rdx) == -2)
    }

    @Test func cmpxchgSuccessAndFailure() throws {
        // mov qword [0x200000],5; mov eax,5; mov ecx,9; lock cmpxchg [0x200000],ecx
        let store: [UInt8] = [0x48, 0xC7, 0x04, 0x25, 0x00, 0x00, 0x20, 0x00, 5, 0, 0, 0]
        let cx: [UInt8] = [0xF0, 0x0F, 0xB1, 0x0C, 0x25, 0x00, 0x00, 0x20, 0x00]
        let s = try Snippet(store + [0xB8, 5, 0, 0, 0, 0xB9, 9, 0, 0, 0] + cx + [0xF4], engine: SoftwareEngine())
        _ = try s.run()
        #expect(try s.memory.load(UInt32.self, at: 0x20_0000) == 9)
        #expect(try s.state.rflags & ZF == ZF)
        let f = try Snippet(store + [0xB8, 4, 0, 0, 0, 0xB9, 9, 0, 0, 0] + cx + [0xF4], engine: SoftwareEngine())
        _ = try f.run()
        #expect(try f.memory.load(UInt32.self, at: 0x20_0000) == 5)
        #expect(try f.state.rax == 5)
        #expect(try f.state.rflags & ZF == 0)
    }
}
