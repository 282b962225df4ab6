import KVMEngine
import TestSupport
import Testing
import VirtCore
@testable import X86Emulator

/// An IDT at 0x5000 whose gate v leads to `mov al, v; hlt` at 0x6000 + 4v, so RAX tells
/// which exception was raised.
func installVectorReportingIDT(_ s: Snippet) throws {
    for v in UInt64(0)..<32 {
        let stub = 0x6000 + v * 4
        try s.memory.write([0xB0, UInt8(v), 0xF4, 0x90], at: stub)
        try s.memory.store(stub | (0x08 << 16) | (0x8E00 << 32), at: 0x5000 + v * 16)
        try s.memory.store(UInt64(0), at: 0x5000 + v * 16 + 8)
    }
}

/// Runs `code` then `hlt` at CPL0 on the software engine; returns the vector raised (nil:
/// none) and the final state.
func faultOf(_ code: [UInt8], _ adjust: @escaping (inout VCPUState) -> Void = { _ in }) throws -> (UInt8?, VCPUState) {
    let marker: UInt64 = 0xAAAA_AAAA_AAAA_AAAA
    let s = try Snippet(code + [0xF4], engine: SoftwareEngine()) { st in
        st.idt = DescriptorTableRegister(base: 0x5000, limit: 32 * 16 - 1)
        st.rax = marker
        adjust(&st)
    }
    try installVectorReportingIDT(s)
    #expect(try s.run() == .halt)
    let st = try s.state
    return (st.rip >= 0x6000 && st.rip < 0x6080 ? UInt8(st.rax & 0xFF) : nil, st)
}

@Suite struct SSEFaultTests {
    static let addps: [UInt8] = [0x0F, 0x58, 0xC1]  // addps xmm0, xmm1
    static let fld1: [UInt8] = [0xD9, 0xE8]

    @Test func sseNeedsOSFXSR() throws {
        #expect(try faultOf(Self.addps) { $0.cr4 = 0x20 }.0 == 6)
        #expect(try faultOf(Self.addps).0 == nil)
    }

    @Test func taskSwitchedRaisesNMAndEmulationRaisesUD() throws {
        #expect(try faultOf(Self.addps) { $0.cr0 |= 8 }.0 == 7)
        #expect(try faultOf(Self.fld1) { $0.cr0 |= 8 }.0 == 7)
        #expect(try faultOf(Self.addps) { $0.cr0 |= 4 }.0 == 6)
        #expect(try faultOf(Self.fld1) { $0.cr0 |= 4 }.0 == 7)
        // FWAIT: #NM only with MP and TS together.
        #expect(try faultOf([0x9B]) { $0.cr0 = ($0.cr0 | 8) & ~2 }.0 == nil)
        #expect(try faultOf([0x9B]) { $0.cr0 |= 8 | 2 }.0 == 7)
        // CLTS clears TS, after which SSE runs.
        #expect(try faultOf([0x0F, 0x06] + Self.addps) { $0.cr0 |= 8 }.0 == nil)
    }

    @Test func misalignedAlignedMovesRaiseGP() throws {
        // mov eax, 0x200001; movaps xmm0, [rax] / movdqa / movups
        let load: [UInt8] = [0xB8, 0x01, 0x00, 0x20, 0x00]
        #expect(try faultOf(load + [0x0F, 0x28, 0x00]).0 == 13)
        #expect(try faultOf(load + [0x66, 0x0F, 0x6F, 0x00]).0 == 13)
        #expect(try faultOf(load + [0x66, 0x0F, 0xEF, 0x00]).0 == 13)  // pxor xmm0, m128
        #expect(try faultOf(load + [0x0F, 0x10, 0x00]).0 == nil)
        #expect(try faultOf(load + [0xF3, 0x0F, 0x6F, 0x00]).0 == nil)
        #expect(try faultOf(load + [0xF2, 0x0F, 0x58, 0x00]).0 == nil)  // addsd: 8 bytes, any alignment
        // FXSAVE needs 16-byte, XSAVE 64-byte alignment.
        #expect(try faultOf([0xB8, 0x08, 0x00, 0x20, 0x00, 0x0F, 0xAE, 0x00]).0 == 13)
        #expect(try faultOf([0xB8, 0x10, 0x00, 0x20, 0x00, 0x0F, 0xAE, 0x00]).0 == nil)
        #expect(try faultOf([0xB8, 0x10, 0x00, 0x20, 0x00, 0x0F, 0xAE, 0x20]) { $0.cr4 |= 1 << 18 }.0 == 13)
    }

    @Test func unmaskedSIMDExceptionRaisesXMAndKeepsTheDestination() throws {
        // ldmxcsr [0x200000] with ZE unmasked; xorpd xmm1, xmm1; divsd xmm0, xmm1
        let code: [UInt8] = [0x0F, 0xAE, 0x14, 0x25, 0x00, 0x00, 0x20, 0x00, 0x66, 0x0F, 0x57, 0xC9, 0xF2, 0x0F, 0x5E, 0xC1]
        func setUp(_ st: inout VCPUState) {
            var f = FPUState()
            f.xmm.replaceSubrange(0..<8, with: withUnsafeBytes(of: (1.5 as Double).bitPattern) { Array($0) })
            st.fpu = f
        }
        let s = try Snippet(code + [0xF4], engine: SoftwareEngine()) { st in
            st.idt = DescriptorTableRegister(base: 0x5000, limit: 32 * 16 - 1)
            setUp(&st)
        }
        try installVectorReportingIDT(s)
        try s.memory.store(UInt32(0x1F80 & ~0x200), at: 0x20_0000)
        #expect(try s.run() == .halt)
        let st = try s.state
        #expect(st.rax & 0xFF == 19)
        let f = try #require(st.fpu)
        #expect(f.mxcsr & 0x4 != 0)  // ZE set
        #expect(f.xmm[0..<8].elementsEqual(withUnsafeBytes(of: (1.5 as Double).bitPattern) { Array($0) }))
        // Without CR4.OSXMMEXCPT the same exception is #UD.
        let t = try Snippet(code + [0xF4], engine: SoftwareEngine()) { st in
            st.idt = DescriptorTableRegister(base: 0x5000, limit: 32 * 16 - 1)
            st.cr4 = 0x220
            setUp(&st)
        }
        try installVectorReportingIDT(t)
        try t.memory.store(UInt32(0x1F80 & ~0x200), at: 0x20_0000)
        #expect(try t.run() == .halt)
        #expect(try t.state.rax & 0xFF == 6)
    }

    @Test func ldmxcsrRejectsReservedBits() throws {
        let s = try Snippet([0x0F, 0xAE, 0x14, 0x25, 0x00, 0x00, 0x20, 0x00, 0xF4], engine: SoftwareEngine()) { st in
            st.idt = DescriptorTableRegister(base: 0x5000, limit: 32 * 16 - 1)
        }
        try installVectorReportingIDT(s)
        try s.memory.store(UInt32(0x1_1F80), at: 0x20_0000)
        #expect(try s.run() == .halt)
        #expect(try s.state.rax & 0xFF == 13)
    }

    @Test func xsetbvValidatesXCR0() throws {
        let osxsave: (inout VCPUState) -> Void = { $0.cr4 |= 1 << 18 }
        func xsetbv(_ eax: UInt32, ecx: UInt32 = 0) -> [UInt8] {
            var b: [UInt8] = [0xB8]
            b += withUnsafeBytes(of: eax.littleEndian) { Array($0) }
            b.append(0xB9)
            b += withUnsafeBytes(of: ecx.littleEndian) { Array($0) }
            b += [0x31, 0xD2, 0x0F, 0x01, 0xD1]  // xor edx,edx; xsetbv
            return b
        }
        #expect(try faultOf(xsetbv(0), osxsave).0 == 13)  // x87 bit clear
        #expect(try faultOf(xsetbv(2), osxsave).0 == 13)
        #expect(try faultOf(xsetbv(7), osxsave).0 == 13)  // AVX not implemented
        #expect(try faultOf(xsetbv(3, ecx: 1), osxsave).0 == 13)
        #expect(try faultOf(xsetbv(3)).0 == 6)  // without CR4.OSXSAVE
        // xsetbv 3; xor ecx,ecx; xgetbv → EAX = 3
        let (vector, st) = try faultOf(xsetbv(3) + [0x31, 0xC9, 0x0F, 0x01, 0xD0], osxsave)
        #expect(vector == nil)
        #expect(st.rax == 3 && st.rdx == 0)
    }

    /// CR4.OSXSAVE on, XCR0 = 3, then XSAVE [0x300000] (EDX:EAX = 3), `between`, XRSTOR.
    static func xsaveRoundTrip(_ between: [UInt8]) -> [UInt8] {
        var b: [UInt8] = [0x0F, 0x20, 0xE0, 0x0D, 0x00, 0x00, 0x04, 0x00, 0x0F, 0x22, 0xE0]  // mov rax,cr4; or eax,OSXSAVE; mov cr4,rax
        b += [0x31, 0xC9, 0xB8, 0x03, 0x00, 0x00, 0x00, 0x31, 0xD2, 0x0F, 0x01, 0xD1]  // xsetbv 3
        b += [0x0F, 0xAE, 0x24, 0x25, 0x00, 0x00, 0x30, 0x00]  // xsave [0x300000]
        b += [0x66, 0x0F, 0x76, 0xC0]  // pcmpeqd xmm0, xmm0 (all ones)
        b += between
        b += [0x0F, 0xAE, 0x2C, 0x25, 0x00, 0x00, 0x30, 0x00]  // xrstor [0x300000]
        return b
    }

    @Test func xsaveAndXrstorFollowXSTATE_BV() throws {
        let pattern: [UInt8] = (0..<16).map { UInt8($0 * 17) }
        let withPattern: (inout VCPUState) -> Void = { st in
            var f = FPUState()
            f.xmm.replaceSubrange(0..<16, with: pattern)
            st.fpu = f
        }
        let (vector, st) = try faultOf(Self.xsaveRoundTrip([]), withPattern)
        #expect(vector == nil)
        #expect(try #require(st.fpu).xmm[0..<16].elementsEqual(pattern))
        // XSTATE_BV without SSE: XRSTOR puts XMM in its initial state (zeros).
        let (v2, st2) = try faultOf(Self.xsaveRoundTrip([0xC6, 0x04, 0x25, 0x00, 0x02, 0x30, 0x00, 0x01]), withPattern)
        #expect(v2 == nil)
        #expect(try #require(st2.fpu).xmm[0..<16].allSatisfy { $0 == 0 })
        // A component XCR0 does not enable: #GP.
        #expect(try faultOf(Self.xsaveRoundTrip([0xC6, 0x04, 0x25, 0x00, 0x02, 0x30, 0x00, 0x07]), withPattern).0 == 13)
    }

    @Test func cpuidAdvertisesTheFloatingPointUnit() throws {
        let (_, one) = try faultOf([0xB8, 1, 0, 0, 0, 0x0F, 0xA2]) { $0.cr4 |= 1 << 18 }
        for bit in [0, 23, 24, 25, 26] { #expect(one.rdx & (1 << UInt64(bit)) != 0, "leaf 1 EDX bit \(bit)") }  // FPU MMX FXSR SSE SSE2
        #expect(one.rcx & (1 << 26) != 0 && one.rcx & (1 << 27) != 0)  // XSAVE, OSXSAVE
        let (_, noOS) = try faultOf([0xB8, 1, 0, 0, 0, 0x0F, 0xA2])
        #expect(noOS.rcx & (1 << 27) == 0)
        let (_, d) = try faultOf([0xB8, 0xD, 0, 0, 0, 0x31, 0xC9, 0x0F, 0xA2])
        #expect(d.rax == 3 && d.rbx == 576 && d.rcx == 576)
    }
}

/// FXSAVE and XSAVE images compared with the real CPU's.
@Suite(.requiresKVM("needs /dev/kvm: the real CPU writes the reference images"))
struct SaveImageTests {
    /// Loads x87 values, sets MXCSR, then FXSAVE64 at 0x300000 and FXSAVE (32-bit form) at
    /// 0x300200, at CPL3.
    static let fxsaveCode: [UInt8] = [0xD9, 0xE8, 0xD9, 0xEB, 0xDE, 0xF9, 0xD9, 0xEE,  // fld1; fldpi; fdivp; fldz
                                      0xC7, 0x44, 0x24, 0xF8, 0x80, 0x3F, 0x00, 0x00, 0x0F, 0xAE, 0x54, 0x24, 0xF8,  // ldmxcsr 0x3f80
                                      0x66, 0x0F, 0xFE, 0xC1, 0xF2, 0x0F, 0x5E, 0xD0,  // paddd xmm0, xmm1; divsd xmm2, xmm0
                                      0x48, 0x0F, 0xAE, 0x04, 0x25, 0x00, 0x00, 0x30, 0x00,
                                      0x0F, 0xAE, 0x04, 0x25, 0x00, 0x02, 0x30, 0x00, 0x0F, 0x0B]

    /// The guest loads XMM0–15 from 0x301000 first (KVM_SET_FPU is not applied faithfully
    /// by this host's KVM, so registers are set by the guest itself).
    func image(_ code: [UInt8], user: Bool, engine: any Engine) throws -> [UInt8] {
        var program: [UInt8] = []
        for r in 0..<16 { program += VectorCase.absoluteMove(r, 0x30_1000 + UInt64(16 * r), store: false) }
        let s = try Snippet(program + code, engine: engine, user: user)
        try s.memory.write((0..<256).map { UInt8(truncatingIfNeeded: $0 &* 37 &+ 11) }, at: 0x30_1000)
        try s.memory.write([UInt8](repeating: 0xEE, count: 0x400), at: 0x30_0000)
        _ = try s.run()
        return try s.memory.read(at: 0x30_0000, count: 0x400)
    }

    /// FIP, FDP and FOP (bytes 6–23) are not tracked by the software engine; MXCSR_MASK
    /// bits above 15 (AMD's misaligned-SSE mask MM, bit 17) are host features it does not have.
    static func withoutInstructionPointers(_ b: [UInt8]) -> [UInt8] {
        var b = b
        for base in [0, 0x200] {
            for k in 6..<24 { b[base + k] = 0 }
            b[base + 30] = 0; b[base + 31] = 0
        }
        return b
    }

    @Test func fxsaveImageMatchesTheRealCPU() throws {
        let expected = Self.withoutInstructionPointers(try image(Self.fxsaveCode, user: true, engine: KVMEngine()))
        for translation in [false, true] {
            let got = Self.withoutInstructionPointers(try image(Self.fxsaveCode, user: true, engine: SoftwareEngine(translation: translation)))
            let differing = (0..<expected.count).filter { expected[$0] != got[$0] }
            #expect(differing.isEmpty, "bytes differ at \(differing.prefix(16).map { String($0, radix: 16) })")
        }
    }
}
