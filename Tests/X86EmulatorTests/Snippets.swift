import KVMEngine
import VMM
import VirtCore
@testable import X86Emulator
#if canImport(Glibc)
import Glibc
#endif

let kvmUsable = access("/dev/kvm", R_OK | W_OK) == 0

/// A tiny machine for running hand-assembled code at 1 MiB: the ABI's page tables and
/// GDT, plus user segments (0x18 data, 0x20 code) for CPL3 runs.
struct Snippet {
    static let codeAddress: UInt64 = 0x10_0000

    let memory: GuestMemory
    let vcpu: any VCPU

    init(_ code: [UInt8], engine: any Engine, user: Bool = false, state adjust: (inout VCPUState) -> Void = { _ in }) throws {
        memory = try GuestMemory(size: 8 << 20)
        try BootLayout.prepare(memory: memory, vcpuCount: 1, commandLine: "", hypercall: engine.hypercallMechanism)
        try memory.store(UInt64(0x00CF_F300_0000_FFFF), at: BootLayout.gdtAddress + 0x18)
        try memory.store(UInt64(0x00AF_FB00_0000_FFFF), at: BootLayout.gdtAddress + 0x20)
        try memory.write(code, at: Self.codeAddress)
        let vm = try engine.makeVM(memory: memory, config: VMConfig(vcpuCount: 1))
        vcpu = try vm.makeVCPU(id: 0)
        var s = BootLayout.initialState(vcpu: 0, entry: Self.codeAddress)
        s.gdt.limit = 0x27
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
