/// Debug registers (SDM Vol. 3B §17.2): DR0–DR3 linear addresses, DR6 status, DR7 control.
/// Instruction breakpoints are honoured (a #DB fault before the instruction, skipped once
/// when RFLAGS.RF is set); data breakpoints are kept but do not trigger. While an
/// instruction breakpoint is armed the vCPU is interpreted.
extension CPU {
    func readDR(_ n: Int) throws(Fault) -> UInt64 {
        switch n {
        case 0: return debugAddress.0
        case 1: return debugAddress.1
        case 2: return debugAddress.2
        case 3: return debugAddress.3
        case 4, 6: guard n == 6 || cr4 & CR.de == 0 else { throw Fault.ud }; return dr6
        case 5, 7: guard n == 7 || cr4 & CR.de == 0 else { throw Fault.ud }; return dr7
        default: throw Fault.ud
        }
    }

    func writeDR(_ n: Int, _ v: UInt64) throws(Fault) {
        switch n {
        case 0: debugAddress.0 = v
        case 1: debugAddress.1 = v
        case 2: debugAddress.2 = v
        case 3: debugAddress.3 = v
        case 4, 6:
            guard n == 6 || cr4 & CR.de == 0 else { throw Fault.ud }
            guard v >> 32 == 0 else { throw Fault.gp() }
            dr6 = v | 0xFFFF_0FF0
        case 5, 7:
            guard n == 7 || cr4 & CR.de == 0 else { throw Fault.ud }
            guard v >> 32 == 0 else { throw Fault.gp() }
            dr7 = (v | 0x400) & ~0xD000
            codeBreakpointsArmed = (0..<4).contains { Self.isCodeBreakpoint(dr7, $0) }
            attention = true  // leave translated code
        default: throw Fault.ud
        }
    }

    /// DR7 enables breakpoint `k` (L or G) for instruction execution (R/W = 00).
    static func isCodeBreakpoint(_ dr7: UInt64, _ k: Int) -> Bool {
        dr7 & (3 << UInt64(2 * k)) != 0 && (dr7 >> UInt64(16 + 4 * k)) & 3 == 0
    }

    /// Before an instruction: #DB if RIP is an armed instruction breakpoint, unless RF says
    /// the instruction is being resumed (RF is then cleared).
    func checkCodeBreakpoints() throws(Fault) {
        if rflags & Flag.rf != 0 { rflags &= ~Flag.rf; return }
        let (a0, a1, a2, a3) = debugAddress
        var hits: UInt64 = 0
        if a0 == rip && Self.isCodeBreakpoint(dr7, 0) { hits |= 1 }
        if a1 == rip && Self.isCodeBreakpoint(dr7, 1) { hits |= 2 }
        if a2 == rip && Self.isCodeBreakpoint(dr7, 2) { hits |= 4 }
        if a3 == rip && Self.isCodeBreakpoint(dr7, 3) { hits |= 8 }
        guard hits != 0 else { return }
        dr6 = (dr6 & ~0xF) | hits | 0xFFFF_0FF0
        throw Fault.exception(vector: 1, errorCode: nil)
    }
}
