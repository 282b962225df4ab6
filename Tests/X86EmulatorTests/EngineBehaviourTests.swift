import Foundation
import TestSupport
import Testing
import VirtCore
@testable import X86Emulator
#if canImport(Glibc)
import Glibc
#endif

/// An IDT at 0x5000 whose gates 0–47 all lead to a `hlt` at 0x6000.
func installHaltingIDT(_ s: Snippet) throws {
    try s.memory.store(UInt8(0xF4), at: 0x6000)
    for v in UInt64(0)..<48 {
        let low: UInt64 = 0x6000 | (0x08 << 16) | (0x8E00 << 32)
        try s.memory.store(low, at: 0x5000 + v * 16)
        try s.memory.store(UInt64(0), at: 0x5000 + v * 16 + 8)
    }
}

func withIDT(_ st: inout VCPUState) { st.idt = DescriptorTableRegister(base: 0x5000, limit: 48 * 16 - 1) }

@Suite struct SoftwareEngineBehaviourTests {
    @Test func pageFaultDeliversCR2AndErrorCode() throws {
        // mov rax,[0x100000000] (not mapped) → #PF
        let s = try Snippet([0x48, 0xA1, 0, 0, 0, 0, 1, 0, 0, 0], engine: SoftwareEngine(), state: withIDT)
        try installHaltingIDT(s)
        #expect(try s.run() == .halt)
        let st = try s.state
        #expect(st.cr2 == 0x1_0000_0000)
        #expect(try s.memory.load(UInt64.self, at: st.rsp) == 0)  // not present, read, supervisor
        #expect(try s.memory.load(UInt64.self, at: st.rsp + 8) == Snippet.codeAddress)  // faulting RIP
        #expect(try s.memory.load(UInt64.self, at: st.rsp + 24) & 0x10000 != 0)  // RF in the pushed RFLAGS
    }

    @Test func userFetchFromSupervisorPageFaultsAndSwitchesStacks() throws {
        // Clear the user bit of the 2 MiB page holding the code, then run it at CPL3: the
        // instruction fetch itself faults, and delivery switches to the TSS's RSP0.
        let s = try Snippet([0x90], engine: SoftwareEngine(), user: true) { withIDT(&$0) }
        try installHaltingIDT(s)
        try s.memory.store(UInt64(0x87 & ~4), at: 0x12000)  // PD[0]: present, writable, 2 MiB, supervisor
        // TSS for the CPL3 → CPL0 stack switch: RSP0 at offset 4.
        var st = try s.state
        st.tr = SegmentRegister(selector: 0, base: 0x7000, limit: 0x67, type: 0xB, present: true)
        try s.vcpu.setState(st)
        try s.memory.store(UInt64(0x9_0000), at: 0x7004)
        #expect(try s.run() == .halt)
        let after = try s.state
        #expect(after.cr2 == Snippet.codeAddress)
        #expect(try s.memory.load(UInt64.self, at: after.rsp) == 0x15)  // present | user | fetch
        #expect(after.cpl == 0)
        #expect(after.rsp < 0x9_0000 && after.rsp >= 0x9_0000 - 64)  // switched to RSP0
    }

    @Test func remappingAfterCR3ReloadIsSeen() throws {
        // Page tables for 0x40000000 (GiB 1) → PD at 0x13000 entry 0: 2 MiB page at 0x200000.
        // mov eax,[0x40000000]; mov [0x13000],rbx (remap to 0x400000); mov rcx,cr3; mov cr3,rcx;
        // mov edx,[0x40000000]; hlt
        let code: [UInt8] = [0x8B, 0x04, 0x25, 0x00, 0x00, 0x00, 0x40,
                             0x48, 0x89, 0x1C, 0x25, 0x00, 0x30, 0x01, 0x00,
                             0x0F, 0x20, 0xD9, 0x0F, 0x22, 0xD9,
                             0x8B, 0x14, 0x25, 0x00, 0x00, 0x00, 0x40, 0xF4]
        let s = try Snippet(code, engine: SoftwareEngine()) { $0.rbx = 0x40_0087 }
        try s.memory.store(UInt64(0x20_0087), at: 0x13000)
        try s.memory.store(UInt32(0xAAAA), at: 0x20_0000)
        try s.memory.store(UInt32(0xBBBB), at: 0x40_0000)
        #expect(try s.run() == .halt)
        let st = try s.state
        #expect(st.rax == 0xAAAA)
        #expect(st.rdx == 0xBBBB)
        // The walk set accessed bits, and dirty only where written.
        #expect(try s.memory.load(UInt64.self, at: 0x13000) & 0x60 == 0x20)
    }

    @Test func codeRewrittenByTheGuestRunsAsRewritten() throws {
        // The loop body's `mov edx, imm32` is decoded and cached on the first pass, then the
        // guest patches its immediate; the second pass must run the new bytes.
        let code: [UInt8] = [
            0x48, 0xC7, 0xC1, 0x02, 0x00, 0x00, 0x00,  // mov rcx, 2
            0xBA, 0x11, 0x11, 0x11, 0x11,  // loop: mov edx, 0x11111111
            0xC7, 0x05, 0xF2, 0xFF, 0xFF, 0xFF, 0x22, 0x22, 0x22, 0x22,  // mov dword [loop+1], 0x22222222
            0x48, 0xFF, 0xC9,  // dec rcx
            0x75, 0xEC,  // jnz loop
            0xF4,  // hlt
        ]
        let s = try Snippet(code, engine: SoftwareEngine())
        #expect(try s.run() == .halt)
        #expect(try s.state.rdx == 0x2222_2222)
    }

    @Test func codeRewrittenByTheVMMIsSeenAfterInvalidation() throws {
        let memory = try GuestMemory(size: 8 << 20)
        try GuestABI.prepare(memory)
        try memory.write([0xBA, 0x11, 0x11, 0x11, 0x11, 0xF4], at: Snippet.codeAddress)  // mov edx, imm; hlt
        let vm = try SoftwareEngine().makeVM(memory: memory, config: VMConfig(vcpuCount: 1)) as! SoftwareVirtualMachine
        let vcpu = try vm.makeVCPU(id: 0)
        try vcpu.setState(GuestABI.entryState(rip: Snippet.codeAddress))
        #expect(try vcpu.run() == .halt)
        try memory.write([0x33, 0x33, 0x33, 0x33], at: Snippet.codeAddress + 1)
        vm.hostDidWrite(gpa: Snippet.codeAddress, length: 4096)
        try vcpu.setState(GuestABI.entryState(rip: Snippet.codeAddress))
        #expect(try vcpu.run() == .halt)
        #expect(try vcpu.getState().rdx == 0x3333_3333)
    }

    @Test func mmioReadCompletesIntoTheDestination() throws {
        // mov ecx,0xd0000000; mov eax,[rcx]; add eax,1; hlt
        let s = try Snippet([0xB9, 0, 0, 0, 0xD0, 0x8B, 0x01, 0x83, 0xC0, 0x01, 0xF4], engine: SoftwareEngine())
        #expect(try s.run() == .mmio(MMIOAccess(address: 0xD000_0000, size: 4, direction: .read)))
        s.vcpu.completeRead(value: 41)
        #expect(try s.run() == .halt)
        #expect(try s.state.rax == 42)
    }

    @Test func preemptionBudgetStopsAfterThatManyInstructions() throws {
        let s = try Snippet([0xEB, 0xFE], engine: SoftwareEngine())  // jmp $
        let v = try #require(s.vcpu as? SoftwareVirtualCPU)
        v.preemptionBudget = 1000
        #expect(try v.run() == .preemptionTimer)
        #expect(v.instructionsRetired == 1000)
    }

    @Test func requestExitFromAnotherThread() throws {
        let s = try Snippet([0xEB, 0xFE], engine: SoftwareEngine())
        let v = s.vcpu
        let kicker = Thread { usleep(20_000); v.requestExit() }
        kicker.start()
        #expect(try v.run() == .interrupted)
    }

    @Test func injectedInterruptWaitsForIF() throws {
        // sti; nop; jmp $   (vector 0x20 → hlt handler)
        let s = try Snippet([0xFB, 0x90, 0xEB, 0xFE], engine: SoftwareEngine(), state: withIDT)
        try installHaltingIDT(s)
        let v = try #require(s.vcpu as? SoftwareVirtualCPU)
        v.injectInterrupt(vector: 0x20)
        v.preemptionBudget = 5000
        #expect(try v.run() == .halt)
        #expect(try s.state.rip == 0x6001)
        // STI's shadow: the interrupt arrives after the NOP, so the pushed RIP is the JMP.
        #expect(try s.memory.load(UInt64.self, at: try s.state.rsp) == Snippet.codeAddress + 2)
        // Without STI the interrupt stays pending.
        let t = try Snippet([0xEB, 0xFE], engine: SoftwareEngine(), state: withIDT)
        try installHaltingIDT(t)
        let w = try #require(t.vcpu as? SoftwareVirtualCPU)
        w.injectInterrupt(vector: 0x20)
        w.preemptionBudget = 5000
        #expect(try w.run() == .preemptionTimer)
    }

    /// A vCPU stopped between STI and HLT (as a snapshot may stop it) keeps STI's shadow
    /// across getState/setState: the HLT runs before the waiting interrupt, which then wakes
    /// it — rather than the interrupt first and a HLT that sleeps for ever.
    @Test func stiShadowSurvivesStateExchange() throws {
        // sti; hlt; jmp $   (vector 0x20 → hlt handler at 0x6000)
        let s = try Snippet([0xFB, 0xF4, 0xEB, 0xFE], engine: SoftwareEngine(), state: withIDT)
        try installHaltingIDT(s)
        let v = try #require(s.vcpu as? SoftwareVirtualCPU)
        v.preemptionBudget = 1
        #expect(try v.run() == .preemptionTimer)
        let betweenSTIAndHLT = try s.state
        #expect(betweenSTIAndHLT.rip == Snippet.codeAddress + 1)
        #expect(betweenSTIAndHLT.interruptBlocking == [.bySTI])

        try v.setState(betweenSTIAndHLT)
        v.injectInterrupt(vector: 0x20)
        #expect(try v.run() == .halt)
        #expect(try s.state.rip == Snippet.codeAddress + 2, "the guest's own HLT ran first")

        var unshadowed = betweenSTIAndHLT
        unshadowed.interruptBlocking = []
        try v.setState(unshadowed)
        v.injectInterrupt(vector: 0x20)
        #expect(try v.run() == .halt)
        #expect(try s.state.rip == 0x6001, "without the shadow the interrupt is taken before the HLT")
    }

    @Test func hypercallExitAndResult() throws {
        // mov eax,0; mov edi,20; mov esi,22; vmcall; hlt
        let s = try Snippet([0xB8, 0, 0, 0, 0, 0xBF, 20, 0, 0, 0, 0xBE, 22, 0, 0, 0, 0x0F, 0x01, 0xC1, 0xF4], engine: SoftwareEngine())
        #expect(try s.run() == .hypercall(Hypercall(number: 0, arg0: 20, arg1: 22)))
        s.vcpu.completeHypercall(result: 42)
        #expect(try s.run() == .halt)
        #expect(try s.state.rax == 42)
    }

    /// Random bytes must end in an exit or a guest exception, never a host crash.
    /// Random bytes, interpreted and translated (translated code runs natively on the
    /// host: whatever it decodes to must stay inside the guest).
    @Test(arguments: [false, true])
    func decoderFuzzNeverCrashesTheHost(translation: Bool) throws {
        var g = SplitMix64(seed: FuzzBudget.seed(0x5EED))
        var undefined = 0
        for _ in 0..<FuzzBudget.iterations(standard: 3000) {
            let bytes = (0..<16).map { _ in UInt8(truncatingIfNeeded: g.next()) }
            let s = try Snippet(bytes, engine: SoftwareEngine(translation: translation), state: withIDT)
            try installHaltingIDT(s)
            let v = try #require(s.vcpu as? SoftwareVirtualCPU)
            v.preemptionBudget = 200
            exits: for _ in 0..<20 {
                switch try v.run() {
                case .halt, .shutdown, .preemptionTimer: break exits
                case .portIO: v.completeRead(value: 0)
                case .mmio: v.completeRead(value: 0)
                case .hypercall: v.completeHypercall(result: 0)
                default: break exits
                }
            }
            if v.exceptionCount > 0 { undefined += 1 }
        }
        #expect(undefined > 100)  // plenty of random encodings fault (#UD, #GP, #PF)
    }
}
