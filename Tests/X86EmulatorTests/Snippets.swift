import KVMEngine
import VirtCore
@testable import X86Emulator
#if canImport(Glibc)
import Glibc
#endif

/// A tiny machine for running hand-assembled code at 1 MiB: the ABI's page tables and
/// GDT, plus user segments (0x18 data, 0x20 code) for CPL3 runs.
struct Snippet {
    static let codeAddress: UInt64 = 0x10_0000

    let memory: GuestMemory
    let vcpu: any VCPU

    init(_ code: [UInt8], engine: any Engine, user: Bool = false, state adjust: (inout VCPUState) -> Void = { _ in }) throws {
        memory = try GuestMemory(size: 8 << 20)
        try GuestABI.prepare(memory)
        try memory.write(code, at: Self.codeAddress)
        let vm = try engine.makeVM(memory: memory, config: VMConfig(vcpuCount: 1))
        vcpu = try vm.makeVCPU(id: 0)
        var s = GuestABI.entryState(rip: Self.codeAddress)
        if user {
            s.cs = .code64(selector: 0x23, dpl: 3)
            let data = SegmentRegister.data(selector: 0x1B, dpl: 3)
            s.ss = data; s.ds = data; s.es = data; s.fs = data; s.gs = data
            s.rsp = 0x70_0000
        }
        adjust(&s)
        try vcpu.setState(s)
    }

    /// Runs until an exit other than port I/O to 0x80 (which it answers with 0).
    func run(limit: Int = 100) throws -> VMExit {
        for _ in 0..<limit {
            let exit = try vcpu.run()
            if case let .portIO(a) = exit, a.port == 0x80 {
                if a.direction == .read { vcpu.completeRead(value: 0) }
                continue
            }
            return exit
        }
        return .interrupted
    }

    var state: VCPUState { get throws { try vcpu.getState() } }
}

/// A small x86-64 assembler for the instruction forms the tests generate.
enum Asm {
    static func rex(w: Bool, r: Int = 0, b: Int = 0) -> UInt8 { 0x40 | (w ? 8 : 0) | UInt8((r >> 3) << 2) | UInt8(b >> 3) }
    static func modrm(_ reg: Int, _ rm: Int) -> UInt8 { 0xC0 | UInt8((reg & 7) << 3) | UInt8(rm & 7) }
    /// `op r/m(dst), reg(src)` register-register form of a one-byte opcode.
    static func rr(_ opcode: UInt8, dst: Int, src: Int, w: Bool = true) -> [UInt8] {
        [rex(w: w, r: src, b: dst), opcode, modrm(src, dst)]
    }
    static func movImm64(_ reg: Int, _ v: UInt64) -> [UInt8] {
        [rex(w: true, b: reg), 0xB8 + UInt8(reg & 7)] + withUnsafeBytes(of: v.littleEndian) { Array($0) }
    }
}

/// The machine docs/guest-abi.md describes, built here so the tests need no VMM: GDT at
/// 0x1000 (null, 0x08 code DPL0, 0x10 data DPL0, plus 0x18 user data and 0x20 user code),
/// PML4 at 0x10000 identity-mapping 4 GiB with 2 MiB present/writable/user pages.
enum GuestABI {
    static let gdt: UInt64 = 0x1000, pml4: UInt64 = 0x10000

    static func prepare(_ memory: GuestMemory) throws {
        try memory.store(UInt64(0), at: gdt)
        try memory.store(UInt64(0x00AF_9B00_0000_FFFF), at: gdt + 0x08)
        try memory.store(UInt64(0x00CF_9300_0000_FFFF), at: gdt + 0x10)
        try memory.store(UInt64(0x00CF_F300_0000_FFFF), at: gdt + 0x18)
        try memory.store(UInt64(0x00AF_FB00_0000_FFFF), at: gdt + 0x20)
        let pdpt = pml4 + 0x1000
        try memory.store(pdpt | 7, at: pml4)
        for g in UInt64(0)..<4 {
            let pd = pml4 + 0x2000 + g * 0x1000
            try memory.store(pd | 7, at: pdpt + g * 8)
            for i in UInt64(0)..<512 { try memory.store((g << 30) | (i << 21) | 0x87, at: pd + i * 8) }
        }
    }

    static func entryState(rip: UInt64) -> VCPUState {
        var s = VCPUState()
        s.rip = rip
        s.rsp = 0xA0000
        s.rdi = 0x2000
        s.rflags = 0x2
        s.cs = .code64(selector: 0x08)
        let data = SegmentRegister.data(selector: 0x10)
        s.ds = data; s.es = data; s.ss = data; s.fs = data; s.gs = data
        s.tr = SegmentRegister(selector: 0, base: 0, limit: 0x67, type: 0xB, present: true)
        s.ldtr = SegmentRegister(selector: 0, unusable: true)
        s.gdt = DescriptorTableRegister(base: gdt, limit: 0x27)
        s.idt = DescriptorTableRegister(base: 0, limit: 0)
        s.cr0 = 0x8005_0033; s.cr3 = pml4; s.cr4 = 0x620; s.efer = 0xD01
        return s
    }
}
