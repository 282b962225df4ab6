import Foundation
import Testing
import VirtCore
@testable import X86Emulator

/// Guest MIPS of the interpreter on two loops. Opt-in (timing belongs in release builds):
/// `SWIFTVISOR_BENCH=1 swift test -c release --filter InterpreterBenchmark`.
@Suite(.enabled(if: ProcessInfo.processInfo.environment["SWIFTVISOR_BENCH"] != nil, "set SWIFTVISOR_BENCH=1 (and use -c release) to measure MIPS"))
struct InterpreterBenchmark {
    func measure(_ name: String, _ code: [UInt8]) throws {
        let s = try Snippet(code, engine: SoftwareEngine())
        let v = try #require(s.vcpu as? SoftwareVirtualCPU)
        let t0 = monotonicNanoseconds()
        #expect(try s.run() == .halt)
        let ns = monotonicNanoseconds() - t0
        let mips = Double(v.instructionsRetired) / Double(ns) * 1e3
        print("benchmark \(name): \(v.instructionsRetired) instructions in \(Double(ns) / 1e6) ms = \(Int(mips)) MIPS (decoded \(v.instructionsDecoded))")
    }

    @Test func registerAndMemoryLoop() throws {
        // mov ecx,N; mov esi,0x200000; L: mov rax,[rsi]; add rax,rcx; mov [rsi+8],rax; xor rdx,rax;
        // inc rbx; dec ecx; jnz L; hlt   (7 instructions per iteration)
        let n: UInt32 = 20_000_000
        let code: [UInt8] = [0xB9] + withUnsafeBytes(of: n.littleEndian) { Array($0) } + [0xBE, 0, 0, 0x20, 0,
            0x48, 0x8B, 0x06, 0x48, 0x01, 0xC8, 0x48, 0x89, 0x46, 0x08, 0x48, 0x31, 0xC2, 0x48, 0xFF, 0xC3, 0xFF, 0xC9,
            0x75, 0xEC, 0xF4]
        try measure("alu+memory loop", code)
    }

    @Test func callReturnLoop() throws {
        // mov ecx,N; L: call F; dec ecx; jnz L; hlt; F: push rbx; lea rbx,[rbx+rcx*2+1]; pop rbx; ret
        let n: UInt32 = 10_000_000
        let code: [UInt8] = [0xB9] + withUnsafeBytes(of: n.littleEndian) { Array($0) } + [
            0xE8, 0x05, 0, 0, 0, 0xFF, 0xC9, 0x75, 0xF7, 0xF4,
            0x53, 0x48, 0x8D, 0x5C, 0x4B, 0x01, 0x5B, 0xC3]
        try measure("call/ret loop", code)
    }
}
