import Testing
import VirtCore
@testable import X86Emulator

/// VERR/VERW (0F 00 /4, /5) at CPL0 against the snippet GDT (0x08 code, 0x10 data DPL0,
/// 0x18 data DPL3, 0x20 code DPL3, limit 0x27): ZF says readable/writable; a null or
/// out-of-table selector clears ZF without a fault (Linux's MDS mitigation runs VERW on
/// every return to user mode).
@Suite struct SegmentVerifyTests {
    /// Runs `verr`/`verw` `selector` with ZF first set to the opposite of `expected`.
    private func zf(write: Bool, selector: UInt16, expectingSet expected: Bool) throws -> Bool {
        let presetZF: [UInt8] = expected ? [0xB9, 1, 0, 0, 0, 0x85, 0xC9] : [0x31, 0xC9]  // mov ecx,1; test ecx,ecx | xor ecx,ecx
        let code: [UInt8] = [0x66, 0xB8, UInt8(selector & 0xFF), UInt8(selector >> 8)] + presetZF + [0x0F, 0x00, write ? 0xE8 : 0xE0]
        let (exit, s) = try execute(code)
        #expect(exit == .halt)
        return s.rflags & ZF != 0
    }

    @Test func dataSegmentsAreWritableCodeIsNot() throws {
        #expect(try zf(write: true, selector: 0x10, expectingSet: true))
        #expect(try zf(write: true, selector: 0x18, expectingSet: true))
        #expect(try !zf(write: true, selector: 0x08, expectingSet: false))
    }

    @Test func readableCodeAndDataAreReadable() throws {
        #expect(try zf(write: false, selector: 0x08, expectingSet: true))
        #expect(try zf(write: false, selector: 0x20, expectingSet: true))
        #expect(try zf(write: false, selector: 0x10, expectingSet: true))
    }

    @Test func nullAndOutOfTableSelectorsClearZFWithoutFault() throws {
        #expect(try !zf(write: true, selector: 0, expectingSet: false))
        #expect(try !zf(write: true, selector: 0x30, expectingSet: false))
        #expect(try !zf(write: false, selector: 0x4000, expectingSet: false))
    }
}
