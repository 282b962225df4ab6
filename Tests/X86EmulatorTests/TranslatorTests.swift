import Foundation
import GuestImages
import TestSupport
import Testing
import VMM
import VirtCore
@testable import X86Emulator

/// The block translator against the interpreter: the same guests, snippets and budgets
/// must give the same results whichever way the software engine runs them.
@Suite(.enabled(if: SoftwareEngine.translationSupported, "the block translator needs a host with BMI2"))
struct TranslatorTests {
    struct Run: Equatable {
        var output: String
        var registers: [UInt64]
        var rip: UInt64
        var rflags: UInt64
        var ramHash: UInt64
        var instructions: UInt64
    }

    func machine(_ guest: String, _ commandLine: String, vcpus: Int = 1, translation: Bool, output: SerialCapture) throws -> Machine {
        let image = try #require(BundledGuests.named(guest))
        return try Machine(image: try ELFImage(bytes: image.elf),
                           configuration: MachineConfiguration(memorySize: 16 << 20, vcpuCount: vcpus, commandLine: commandLine,
                                                               timeoutSeconds: 120),
                           engine: SoftwareEngine(translation: translation), serialOutput: output.append)
    }

    func run(_ guest: String, _ commandLine: String, translation: Bool, input: String = "") throws -> (Run, blocks: UInt64) {
        let out = SerialCapture()
        let machine = try machine(guest, commandLine, translation: translation, output: out)
        machine.uart.enqueueInput(Array(input.utf8))
        _ = try machine.run()
        let s = try machine.vcpuState(0)
        let v = try #require(machine.allVCPUs[0] as? SoftwareVirtualCPU)
        #expect(v.usesTranslation == translation)
        return (Run(output: out.text, registers: s.gprs, rip: s.rip, rflags: s.rflags, ramHash: machine.memory.contentHash(),
                    instructions: v.instructionsRetired), v.blocksTranslated)
    }

    static let guests: [(String, String)] = [
        ("hello", ""), ("compute", "scale=1"), ("coverage", ""), ("fault", ""), ("triple-fault", ""), ("user-mode", ""),
        ("hypercall", ""), ("mmio-touch", ""), ("pio-loop", "count=2000 ring=3"), ("irq-test", ""), ("echo", ""),
        ("xmodify", "rounds=50"), ("vector-math", ""),
    ]

    /// Several vCPUs run translated code too: a function rewritten by CPU 1 after CPU 1
    /// cached a write permission for its page (before CPU 0 made it a code page) runs as
    /// rewritten on CPU 0; locked counters stay exact; and a spinlock released by a plain
    /// store is never lost under another CPU's XCHG (no hang, exact count).
    @Test(arguments: ["xmodify rounds=100", "smp count=3000", "spinlock count=20000"])
    func sharedMemoryGuestsRunTranslated(_ spec: String) throws {
        let (guest, commandLine) = (String(spec.prefix { $0 != " " }), String(spec.drop { $0 != " " }.dropFirst()))
        let out = SerialCapture()
        let machine = try machine(guest, commandLine, vcpus: 2, translation: true, output: out)
        let result = try machine.run()
        #expect(result.stopReason == .exitPort(status: 0), "\(out.text)")
        let vcpus = machine.allVCPUs.compactMap { $0 as? SoftwareVirtualCPU }
        #expect(vcpus.count == 2 && vcpus.allSatisfy { $0.usesTranslation && $0.blocksTranslated > 0 })
        if guest == "xmodify" { #expect(out.text.contains("xmodify: 100 rewrites by cpu 1, each run as rewritten by cpu 0")) }
        if guest == "smp" { #expect(out.text.contains("smp: 2 cpus, counter=6000")) }
        if guest == "spinlock" { #expect(out.text.contains("spinlock: 2 cpus, counter=40000")) }
    }

    /// Output, registers, RFLAGS, RAM and the instruction count (so the TSC and the
    /// preemption timer see the same guest) agree for every guest.
    @Test(arguments: guests.map { "\($0.0)|\($0.1)" })
    func translatedGuestsMatchInterpretedOnes(_ spec: String) throws {
        let parts = spec.split(separator: "|", omittingEmptySubsequences: false).map(String.init)
        let (interpreted, _) = try run(parts[0], parts[1], translation: false, input: "translated\n")
        let (translated, blocks) = try run(parts[0], parts[1], translation: true, input: "translated\n")
        #expect(blocks > 0, "no block was translated")
        #expect(translated == interpreted)
    }

    /// A code buffer too small for the guest's blocks is emptied and refilled as often as
    /// needed, without changing what the guest computes.
    @Test func fullCodeBufferStartsOver() throws {
        let out = SerialCapture()
        let machine = try machine("compute", "scale=1", translation: true, output: out)
        let v = try #require(machine.allVCPUs[0] as? SoftwareVirtualCPU)
        v.cpu.translator = try #require(BlockTranslator(capacity: 2 * BlockTranslator.blockReserve))
        _ = try machine.run()
        let (reference, _) = try run("compute", "scale=1", translation: false)
        #expect(out.text == reference.output)
        #expect(try #require(v.cpu.translator).resets > 0)
    }

    /// Translated code runs from a read+execute view of its buffer and is written through a
    /// separate read+write view: no mapping of the process is writable and executable.
    @Test func noMappingIsWritableAndExecutable() throws {
        let (s, v) = try snippet([0xB9, 0x10, 0x00, 0x00, 0x00, 0xFF, 0xC9, 0x75, 0xFC, 0xF4], translation: true)  // loop; hlt
        #expect(try s.run() == .halt)
        #expect(v.blocksTranslated > 0)
        // Read while the snippet's translator (and its buffer) is alive: ARC may end it after its last use.
        let maps = try withExtendedLifetime(s) { try String(contentsOfFile: "/proc/self/maps", encoding: .utf8) }
        let writableAndExecutable = maps.split(separator: "\n").filter { line in
            let perms = line.split(separator: " ").dropFirst().first ?? ""
            return perms.hasPrefix("rwx")
        }
        #expect(writableAndExecutable.isEmpty, "\(writableAndExecutable)")
        #expect(maps.contains("swiftvisor-translated-code"))
    }

    func snippet(_ code: [UInt8], translation: Bool, state: (inout VCPUState) -> Void = { _ in }) throws -> (Snippet, SoftwareVirtualCPU) {
        let s = try Snippet(code, engine: SoftwareEngine(translation: translation), state: state)
        return (s, try #require(s.vcpu as? SoftwareVirtualCPU))
    }

    /// A loop whose flags cross block boundaries: ADC reads the carry of an ADD in the
    /// block before, through a JMP, and SETC reads flags a JNZ block left behind.
    @Test func flagsLiveAcrossBlocks() throws {
        // mov ecx,1000; xor eax,eax; xor edx,edx; mov rbx,-1
        // L: add rax,rbx; jmp M   M: adc rdx,0; dec ecx; jnz L   setc sil; hlt
        let code: [UInt8] = [0xB9, 0xE8, 0x03, 0, 0, 0x31, 0xC0, 0x31, 0xD2, 0x48, 0xC7, 0xC3, 0xFF, 0xFF, 0xFF, 0xFF,
                             0x48, 0x01, 0xD8, 0xEB, 0x00,
                             0x48, 0x83, 0xD2, 0x00, 0xFF, 0xC9, 0x75, 0xF3,
                             0x40, 0x0F, 0x92, 0xC6, 0xF4]
        var results: [VCPUState] = []
        for translation in [false, true] {
            let (s, v) = try snippet(code, translation: translation)
            #expect(try s.run() == .halt)
            results.append(try s.state)
            if translation { #expect(v.blocksTranslated > 0) }
        }
        // 1000 × (2^64 - 1) = 999 × 2^64 + (2^64 - 1000)
        #expect(results[1].rax == UInt64(0) &- 1000)
        #expect(results[1].rdx == 999)
        #expect(results[1].gprs == results[0].gprs)
        #expect(results[1].rflags == results[0].rflags)
    }

    /// An MMIO store in the middle of a block: the instructions before it are done, with
    /// their flags, and the store is reported and completed by the interpreter.
    @Test func exitInTheMiddleOfABlockKeepsEarlierWork() throws {
        // mov eax,1; add eax,eax; mov ebx,0xd0000000; mov [rbx],eax; inc eax; hlt
        let code: [UInt8] = [0xB8, 1, 0, 0, 0, 0x01, 0xC0, 0xBB, 0, 0, 0, 0xD0, 0x89, 0x03, 0xFF, 0xC0, 0xF4]
        let (s, _) = try snippet(code, translation: true)
        #expect(try s.run() == .mmio(MMIOAccess(address: 0xD000_0000, size: 4, direction: .write, value: 2)))
        let mid = try s.state
        #expect(mid.rax == 2 && mid.rbx == 0xD000_0000)
        #expect(mid.rip == Snippet.codeAddress + 14)
        #expect(mid.rflags & 0x8D5 == 0)  // flags of 1+1
        #expect(try s.run() == .halt)
        #expect(try s.state.rax == 3)
    }

    /// The preemption timer counts every instruction exactly, even when a budget ends
    /// inside a translated block.
    @Test(arguments: [1, 7, 1000, 4097])
    func preemptionTimerIsExactInsideBlocks(_ budget: UInt64) throws {
        // L: inc rax; add rbx,2; dec rcx; jmp L
        let code: [UInt8] = [0x48, 0xFF, 0xC0, 0x48, 0x83, 0xC3, 0x02, 0x48, 0xFF, 0xC9, 0xEB, 0xF4]
        var states: [VCPUState] = []
        for translation in [false, true] {
            let (_, v) = try snippet(code, translation: translation)
            v.preemptionBudget = budget
            #expect(try v.run() == .preemptionTimer)
            #expect(v.instructionsRetired == budget)
            states.append(try v.getState())
        }
        #expect(states[0].gprs == states[1].gprs)
        #expect(states[0].rip == states[1].rip)
    }

    /// Memory operands with FS/GS bases, a 32-bit address size and RIP-relative addressing.
    @Test func segmentOverridesAddressSizeAndRIPRelative() throws {
        let code: [UInt8] = [
            0x64, 0x48, 0x8B, 0x04, 0x25, 0x08, 0x00, 0x00, 0x00,  // mov rax, fs:[8]
            0x65, 0x48, 0x8B, 0x1C, 0x25, 0x10, 0x00, 0x00, 0x00,  // mov rbx, gs:[16]
            0x48, 0xB9, 0x10, 0x00, 0x20, 0x00, 0xFF, 0xFF, 0xFF, 0xFF,  // mov rcx, 0xffffffff00200010
            0x67, 0x8B, 0x11,                                      // mov edx, [ecx]   (address 0x200010)
            0x64, 0x67, 0x89, 0x01,                                // mov fs:[ecx], eax
            0x48, 0x8D, 0x35, 0x00, 0x01, 0x00, 0x00,              // lea rsi, [rip+0x100]
            0x48, 0x8B, 0x3D, 0xCF, 0x0F, 0x00, 0x00,              // mov rdi, [rip+0xfcf] (= code + 0x1000)
            0xF4,
        ]
        var states: [VCPUState] = []
        for translation in [false, true] {
            let (s, v) = try snippet(code, translation: translation) { st in
                st.fs.base = 0x30_0000
                st.gs.base = 0x30_0100
            }
            try s.memory.store(UInt64(0xF5F5), at: 0x30_0008)
            try s.memory.store(UInt64(0x6565), at: 0x30_0110)
            try s.memory.store(UInt32(0xADD32), at: 0x20_0010)
            try s.memory.store(UInt64(0x4119), at: Snippet.codeAddress + 0x1000)
            #expect(try s.run() == .halt)
            let st = try s.state
            #expect(st.rax == 0xF5F5 && st.rbx == 0x6565 && st.rdx == 0xADD32)
            #expect(st.rsi == Snippet.codeAddress + 42 + 0x100)
            #expect(st.rdi == 0x4119)
            #expect(try s.memory.load(UInt32.self, at: 0x30_0000 + 0x20_0010) == 0xF5F5)
            if translation { #expect(v.blocksTranslated > 0 && v.instructionsInterpreted < 4) }
            states.append(st)
        }
        #expect(states[0].gprs == states[1].gprs)
    }

    /// A block that loops on itself keeps registers in host registers between iterations;
    /// an exit in a later iteration (a store that has walked past RAM into MMIO) must still
    /// leave every register the earlier iterations wrote.
    @Test func exitInALaterLoopIterationKeepsEarlierIterations() throws {
        // mov edi,0x7fe000; mov ecx,4; xor eax,eax
        // L: add dword [0x200000],1; mov [rdi],eax; add rdi,0x1000; inc eax; dec ecx; jnz L; hlt
        // (the counter makes a replayed iteration visible)
        let code: [UInt8] = [0xBF, 0x00, 0xE0, 0x7F, 0x00, 0xB9, 0x04, 0x00, 0x00, 0x00, 0x31, 0xC0,
                             0x83, 0x04, 0x25, 0x00, 0x00, 0x20, 0x00, 0x01,
                             0x89, 0x07, 0x48, 0x81, 0xC7, 0x00, 0x10, 0x00, 0x00, 0xFF, 0xC0, 0xFF, 0xC9, 0x75, 0xE9, 0xF4]
        var runs: [([VMExit], VCPUState)] = []
        for translation in [false, true] {
            let (s, _) = try snippet(code, translation: translation)
            var exits: [VMExit] = []
            while true {
                let e = try s.run()
                exits.append(e)
                if case .mmio = e { continue }
                break
            }
            #expect(try s.memory.load(UInt32.self, at: 0x7F_F000) == 1)
            #expect(try s.memory.load(UInt32.self, at: 0x20_0000) == 4, "iterations counted")
            runs.append((exits, try s.state))
        }
        #expect(runs[1].0 == [.mmio(MMIOAccess(address: 0x80_0000, size: 4, direction: .write, value: 2)),
                              .mmio(MMIOAccess(address: 0x80_1000, size: 4, direction: .write, value: 3)), .halt])
        #expect(runs[0].0 == runs[1].0)
        #expect(runs[1].1.rax == 4 && runs[1].1.rdi == 0x80_2000 && runs[1].1.rcx == 0)
        #expect(runs[0].1.gprs == runs[1].1.gprs && runs[0].1.rflags == runs[1].1.rflags)
    }

    /// A loop that overwrites an instruction of its own (already translated) block.
    @Test func selfModifyingLoopRunsTheNewCode() throws {
        // mov ecx,3; L: mov edx,0x11111111; add esi,edx; mov dword [L+1],0x22222222; dec ecx; jnz L; hlt
        let code: [UInt8] = [0xB9, 0x03, 0, 0, 0,
                             0xBA, 0x11, 0x11, 0x11, 0x11,
                             0x01, 0xD6,
                             0xC7, 0x05, 0xF0, 0xFF, 0xFF, 0xFF, 0x22, 0x22, 0x22, 0x22,
                             0xFF, 0xC9, 0x75, 0xE9, 0xF4]
        let (s, _) = try snippet(code, translation: true)
        #expect(try s.run() == .halt)
        #expect(try s.state.rsi == 0x1111_1111 + 2 * 0x2222_2222)
    }

    /// A page that was written (so the translator's TLB may hold a write permission for
    /// it) and then becomes code: later stores to it must still invalidate its blocks.
    @Test func pageThatBecomesCodeLosesCachedWritePermission() throws {
        // Page B (0x101000): mov eax, 0x33333333; ret
        // Page A: mov dword [B+1],0x11111111; call B; mov ebx,eax; mov dword [B+1],0x22222222; call B; hlt
        let b: UInt64 = Snippet.codeAddress + 0x1000
        func store(_ v: UInt32) -> [UInt8] {
            [0xC7, 0x04, 0x25] + withUnsafeBytes(of: UInt32(b + 1).littleEndian) { Array($0) } + withUnsafeBytes(of: v.littleEndian) { Array($0) }
        }
        let code: [UInt8] = store(0x1111_1111) + [0xE8, 0xF0, 0x0F, 0, 0, 0x89, 0xC3] + store(0x2222_2222) + [0xE8, 0xDE, 0x0F, 0, 0, 0xF4]
        for translation in [false, true] {
            let (s, _) = try snippet(code, translation: translation) { $0.rsp = 0x20_0000 }
            try s.memory.write([0xB8, 0x33, 0x33, 0x33, 0x33, 0xC3], at: b)
            #expect(try s.run() == .halt)
            let st = try s.state
            #expect(st.rbx == 0x1111_1111)
            #expect(st.rax == 0x2222_2222)
        }
    }
}
