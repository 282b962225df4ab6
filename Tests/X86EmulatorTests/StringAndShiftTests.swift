import KVMEngine
import TestSupport
import Testing
import VirtCore
@testable import X86Emulator

/// Runs `code` + `ud2` at CPL3 on an engine; returns registers, flags and 64 bytes at 0x300000.
func runUser(_ code: [UInt8], on engine: any Engine, setup: (inout VCPUState) -> Void) throws -> ([UInt64], UInt64, [UInt8]) {
    let s = try Snippet(code + [0x0F, 0x0B], engine: engine, user: true, state: setup)
    try s.memory.write(Array("abcdefgh-abcdeXgh".utf8), at: 0x30_0000)
    #expect(try s.run() == .shutdown)
    let st = try s.state
    return (st.gprs, st.rflags & (CF | ZF | SF | PF | OF), try s.memory.read(at: 0x30_0000, count: 64))
}

@Suite(.requiresKVM("needs /dev/kvm: CPL3 code runs natively there, so it is the reference CPU"))
struct StringAndShiftTests {
    func compare(_ code: [UInt8], flagMask: UInt64 = CF | ZF | SF | PF | OF, _ setup: @escaping (inout VCPUState) -> Void,
                 sourceLocation: SourceLocation = #_sourceLocation) throws {
        let hw = try runUser(code, on: try KVMEngine(), setup: setup)
        let sw = try runUser(code, on: SoftwareEngine(), setup: setup)
        #expect(sw.0 == hw.0, sourceLocation: sourceLocation)
        #expect(sw.1 & flagMask == hw.1 & flagMask, sourceLocation: sourceLocation)
        #expect(sw.2 == hw.2, sourceLocation: sourceLocation)
    }

    @Test func repeCmpsbStopsAtTheFirstDifference() throws {
        // rsi=0x300000 rdi=0x300009 rcx=8; repe cmpsb
        try compare([0xF3, 0xA6]) { $0.rsi = 0x30_0000; $0.rdi = 0x30_0009; $0.rcx = 8 }
    }

    @Test func repneScasbFindsAByte() throws {
        // al='-'; rdi=0x300000; rcx=20; repne scasb
        try compare([0xF2, 0xAE]) { $0.rax = UInt64(UInt8(ascii: "-")); $0.rdi = 0x30_0000; $0.rcx = 20 }
    }

    @Test func repMovsAndStosBackwards() throws {
        // std; rep movsq (2) from 0x300008 to 0x300028; then rep stosd (3) at 0x300030; cld
        try compare([0xFD, 0xF3, 0x48, 0xA5, 0x48, 0xC7, 0xC1, 3, 0, 0, 0, 0x48, 0xC7, 0xC7, 0x30, 0, 0x30, 0, 0xF3, 0xAB, 0xFC]) {
            $0.rsi = 0x30_0008; $0.rdi = 0x30_0028; $0.rcx = 2; $0.rax = 0x1122_3344_5566_7788
        }
    }

    @Test(arguments: [0, 1, 7, 31, 32, 63] as [UInt8])
    func shldAndShrd(count: UInt8) throws {
        // shld rax,rbx,count; shrd rdx,rbx,cl; shrd esi,ebx,count (32-bit). OF is undefined
        // for counts above 1, so it is compared only for 0 and 1.
        try compare([0x48, 0x0F, 0xA4, 0xD8, count, 0x48, 0x0F, 0xAD, 0xDA, 0x0F, 0xAC, 0xDE, count],
                    flagMask: count <= 1 ? CF | ZF | SF | PF | OF : CF | ZF | SF | PF) {
            $0.rax = 0x8123_4567_89AB_CDEF; $0.rbx = 0xFEDC_BA98_7654_3210; $0.rdx = 0x0F0F_0F0F_F0F0_F0F0
            $0.rsi = 0xFFFF_FFFF_8000_0001; $0.rcx = UInt64(count)
        }
    }

    @Test(arguments: [0, 1, 3] as [UInt8])
    func enterBuildsFrames(level: UInt8) throws {
        // enter 0x20, level; leave is not run so the frame stays visible in registers and memory
        try compare([0xC8, 0x20, 0x00, level]) { $0.rsp = 0x30_0040 - 0x10 + 0x40; $0.rbp = 0x30_0038 }
    }
}

@Suite struct StringPortIOTests {
    @Test func repOutsbIsOneExitPerByte() throws {
        // lea rsi,[rip+12]; mov ecx,3; mov dx,0x81; rep outsb; hlt; "abc"
        let code: [UInt8] = [0x48, 0x8D, 0x35, 0x0C, 0, 0, 0, 0xB9, 3, 0, 0, 0, 0x66, 0xBA, 0x81, 0x00, 0xF3, 0x6E, 0xF4,
                             0x61, 0x62, 0x63]
        let s = try Snippet(code, engine: SoftwareEngine())
        var bytes: [UInt8] = []
        while case let .portIO(a) = try s.vcpu.run() {
            #expect(a.port == 0x81 && a.direction == .write)
            bytes.append(UInt8(a.value))
        }
        #expect(bytes == Array("abc".utf8))
        #expect(try s.state.rcx == 0)
    }

    @Test func repInsbStoresEachValue() throws {
        // mov edi,0x300000; mov ecx,3; mov dx,0x81; rep insb; hlt
        let code: [UInt8] = [0xBF, 0, 0, 0x30, 0, 0xB9, 3, 0, 0, 0, 0x66, 0xBA, 0x81, 0x00, 0xF3, 0x6C, 0xF4]
        let s = try Snippet(code, engine: SoftwareEngine())
        var next: UInt64 = 0x41
        while case let .portIO(a) = try s.vcpu.run() {
            #expect(a.direction == .read && a.port == 0x81)
            s.vcpu.completeRead(value: next)
            next += 1
        }
        #expect(try s.memory.read(at: 0x30_0000, count: 4) == [0x41, 0x42, 0x43, 0])
        #expect(try s.state.rdi == 0x30_0003)
    }
}
