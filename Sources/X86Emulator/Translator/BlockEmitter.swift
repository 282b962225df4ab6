/// Emits the host code of one block (see `BlockTranslator`).
struct BlockEmitter {
    typealias C = TranslatorContext
    let rax = HostReg.rax, rcx = HostReg.rcx, rbx = HostReg.rbx, rsi = HostReg.rsi, rdi = HostReg.rdi

    var a: HostAssembler
    let translator: BlockTranslator
    /// Host register caching each guest register (-1: not used by the block).
    var host = GuestRegisterMap()
    /// Guest registers written so far (stored back at every exit).
    var dirty: UInt16 = 0
    /// Host RFLAGS hold the guest's arithmetic flags, newer than the context's copy.
    var flagsLive = false
    let count: Int

    struct PendingMiss { var jump: HostLabel; var back: Int; var index: Int; var rip: UInt64; var kind: UInt64; var flagsLive: Bool; var dirty: UInt16 }
    struct PendingFail { var jump: HostLabel; var index: Int; var rip: UInt64; var dirty: UInt16 }
    struct PendingChain { var jump: HostLabel; var target: UInt64 }
    /// The stubs to emit after the body; their storage is the translator's, reused block after block.
    var misses: [PendingMiss]
    var fails: [PendingFail]
    var chains: [PendingChain]
    /// The block's linear page: direct branches within it are chained.
    var page: UInt64 = 0
    /// Offset (in the block) where chained branches enter, past the generation check.
    var chainedEntry = 0
    /// The block's first guest instruction, and where its body starts (registers loaded,
    /// flags restored): a branch back to the block's start loops to `body` directly.
    var blockRip: UInt64 = 0
    var body = 0
    var restoresFlags = false
    let budget = BlockTranslator.budgetRegister

    /// `loopsWriting`: the block branches back to its own start, and these are the guest
    /// registers it writes — a later iteration's early exit must store them all.
    init(translator: BlockTranslator, used: UInt16, count: Int, loopsWriting: UInt16?) {
        self.translator = translator
        a = translator.assembler()
        misses = translator.spare.takeMisses()
        fails = translator.spare.takeFails()
        chains = translator.spare.takeChains()
        self.count = count
        dirty = loopsWriting ?? 0
        var next = 0
        for g in 0..<16 where used & (1 << g) != 0 {
            host[g] = BlockTranslator.cacheRegisters[next]
            next += 1
        }
    }

    // MARK: Prologue and exits

    /// `frame`: the guest-physical page the block's code is on (whose generation guards it).
    mutating func prologue(rip: UInt64, frame: UInt64, gen: UInt32, restoreFlags: Bool) {
        page = rip >> 12
        a.mov64(rax, .at(rbx, C.codeGens))
        a.mov32(rax, .at(rax, Int32(truncatingIfNeeded: frame * 4)))
        a.byte(0x25); a.imm32(0x7FFF_FFFF)                       // and eax, ~hasCode
        a.byte(0x3D); a.imm32(Int32(bitPattern: gen))            // cmp eax, gen
        let stale = a.jccForward(0x5)
        // Chained branches enter here: their source block passed the check on this page, and
        // pages change only outside translated code (which is re-entered through the check).
        chainedEntry = a.position
        a.subImm(budget, Int32(count))
        let short = a.jccForward(0xC)                            // jl
        for g in 0..<16 where host[g] >= 0 { a.mov64(host[g], .at(rbx, Int32(g * 8))) }
        if restoreFlags {
            a.restoreFlags(from: C.flags)
            flagsLive = true
        }
        blockRip = rip
        restoresFlags = restoreFlags
        let bodyJump = a.jmpForward()
        a.bind(stale)
        exitWith(.invalid, rip: rip)
        a.bind(short)
        a.addImm(budget, Int32(count))
        exitWith(.budget, rip: rip)
        a.bind(bodyJump)
        body = a.position
    }

    /// The branch back to the block's start: registers stay in host registers. Flags go to
    /// the context (an early exit in the next iteration needs them there), the budget is
    /// taken again, and the flags come back only if the body needs them.
    mutating func loopBack() {
        if flagsLive { a.saveFlags(at: C.flags) }
        a.subImm(budget, Int32(count))
        let short = a.jccForward(0xC)
        if restoresFlags { a.restoreFlags(from: C.flags) }
        a.jmp(to: body)
        a.bind(short)
        a.addImm(budget, Int32(count))
        storeDirty(dirty)
        exitWith(.budget, rip: blockRip)
    }

    mutating func exitWith(_ reason: TranslatorExit, rip: UInt64) {
        a.movImm(rax, rip)
        a.store64(.at(rbx, C.rip), rax)
        a.movImm(rax, UInt64(reason.rawValue))
        a.jmp(bufferOffset: translator.epilogue)
    }

    mutating func saveFlagsIfLive() {
        if flagsLive { a.saveFlags(at: C.flags); flagsLive = false }
    }

    mutating func storeDirty(_ mask: UInt16) {
        for g in 0..<16 where mask & (1 << g) != 0 { a.store64(.at(rbx, Int32(g * 8)), host[g]) }
    }

    /// Leaves for `target` (flags saved, registers stored).
    mutating func leave(to target: UInt64) {
        if target == blockRip { loopBack(); return }
        saveFlagsIfLive()
        storeDirty(dirty)
        jump(to: target)
    }

    /// A direct branch out of the block: a patchable JMP when `target` is on the block's
    /// page, otherwise through the jump cache.
    mutating func jump(to target: UInt64) {
        if target >> 12 == page {
            chains.append(PendingChain(jump: a.jmpForward(), target: target))
        } else {
            a.movImm(rax, target)
            a.jmp(bufferOffset: translator.lookup)
        }
    }

    /// Leaves so that the interpreter runs the instruction at `rip`.
    mutating func leaveToInterpreter(at rip: UInt64) {
        saveFlagsIfLive()
        storeDirty(dirty)
        exitWith(.interpret, rip: rip)
    }

    // MARK: Memory operands

    /// The operand's linear address into RSI (with the FS/GS base when `segment`).
    mutating func address(_ i: Instr, next: UInt64, segment: Bool) {
        if i.base == 17 {
            a.movImm(rsi, next &+ i.disp)
        } else {
            let b = i.base < 16 ? host[Int(i.base)] : nil
            let x = i.index < 16 ? host[Int(i.index)] : nil
            if b == nil && x == nil {
                a.movImm(rsi, i.disp)
            } else {
                a.lea(rsi, .mem(base: b, index: x, scale: Int(i.scale), disp: Int32(truncatingIfNeeded: i.disp)))
            }
        }
        if i.addr32 { a.mov32(rsi, .reg(rsi)) }
        if segment && i.seg != 0 {
            a.mov64(rdi, .at(rbx, i.seg == 1 ? C.fsBase : C.gsBase))
            a.lea(rsi, .mem(base: rsi, index: rdi, scale: 0, disp: 0))
        }
    }

    /// Inline TLB lookup: RSI linear → RSI host address, without touching RFLAGS. A miss
    /// (including an access crossing its page) goes to an out-of-line call of the helper.
    mutating func translate(size: Int, write: Bool, index: Int, rip: UInt64) {
        let tag: Int32 = write ? 8 : 0
        a.pext(rdi, rsi, mask: .at(rbx, C.tlbIndexMask))
        a.lea(rdi, .mem(base: nil, index: rdi, scale: 2, disp: 0))           // ×4: 32-byte entries
        if size > 1 {
            a.lea(rcx, .at(rsi, Int32(size - 1)))
            a.pext(rcx, rcx, mask: .at(rbx, C.pageNumberMask))               // page of the last byte
        } else {
            a.pext(rcx, rsi, mask: .at(rbx, C.pageNumberMask))
        }
        a.not64(rcx)
        a.mov64(rax, .mem(base: rbx, index: rdi, scale: 3, disp: C.tlb + tag))
        a.lea(rcx, .mem(base: rax, index: rcx, scale: 0, disp: 1))           // tag - page
        a.bytes(0xE3, 0x05)                                                  // jrcxz hit
        let miss = a.jmpForward()
        var codeMiss: HostLabel?
        if write && translator.sharedMemory {
            // Another vCPU may have made the page a code page since the entry was filled.
            a.mov64(rax, .mem(base: rbx, index: rdi, scale: 3, disp: C.tlb + 24))
            a.mov32(rax, .at(rax))
            a.pext32(rcx, rax, mask: .at(rbx, C.hasCodeMask))
            a.bytes(0xE3, 0x05)                                              // jrcxz ok
            codeMiss = a.jmpForward()
        }
        a.mov64(rax, .mem(base: rbx, index: rdi, scale: 3, disp: C.tlb + 16))
        a.lea(rsi, .mem(base: rsi, index: rax, scale: 0, disp: 0))
        let kind = UInt64(size) | (write ? 0x100 : 0)
        misses.append(PendingMiss(jump: miss, back: a.position, index: index, rip: rip, kind: kind, flagsLive: flagsLive, dirty: dirty))
        if let codeMiss {
            misses.append(PendingMiss(jump: codeMiss, back: a.position, index: index, rip: rip, kind: kind, flagsLive: flagsLive, dirty: dirty))
        }
    }

    /// A jump to the stub that hands instruction `index` to the interpreter.
    mutating func failIfNotEqual(index: Int, rip: UInt64) {
        fails.append(PendingFail(jump: a.jccForward(0x5), index: index, rip: rip, dirty: dirty))
    }

    /// RAX must be canonical to be a branch target; otherwise the interpreter raises #GP on
    /// the branch itself. Clobbers RCX and RFLAGS.
    mutating func checkCanonical(index: Int, rip: UInt64) {
        a.bytes(0x48, 0x89, 0xC1)                 // mov rcx, rax
        a.bytes(0x48, 0xC1, 0xE1, 0x10)           // shl rcx, 16
        a.bytes(0x48, 0xC1, 0xF9, 0x10)           // sar rcx, 16
        a.bytes(0x48, 0x39, 0xC1)                 // cmp rcx, rax
        failIfNotEqual(index: index, rip: rip)
    }

    /// The out-of-line stubs, after the block's body.
    mutating func finish() {
        for m in misses {
            a.bind(m.jump)
            if m.flagsLive { a.saveFlags(at: C.flags) }
            storeDirty(m.dirty)
            a.store64(.reg(rdi), rbx)                                        // mov rdi, rbx (RSI: linear)
            a.movImm(HostReg.rdx, m.kind)
            a.instruction(HostOpcode(0xFF), w: false, reg: 2, rm: .at(rbx, C.missHelper))  // call [helper]
            a.bytes(0x48, 0x85, 0xC0)                                        // test rax, rax
            let failed = a.jccForward(0x4)
            a.store64(.reg(rsi), rax)                                        // mov rsi, rax
            for g in 0..<16 where host[g] >= 0 { a.mov64(host[g], .at(rbx, Int32(g * 8))) }
            if m.flagsLive { a.restoreFlags(from: C.flags) }
            a.jmp(to: m.back)
            a.bind(failed)
            interpreterExit(index: m.index, rip: m.rip, dirty: 0)  // registers already stored
        }
        for f in fails {
            a.bind(f.jump)
            interpreterExit(index: f.index, rip: f.rip, dirty: f.dirty)
        }
        // First use of a chainable branch: ask the dispatcher to patch the JMP.
        let base = UInt64(UInt(bitPattern: translator.code)) &+ UInt64(a.origin)
        for c in chains {
            a.bind(c.jump)
            a.movImm(rcx, base &+ UInt64(c.jump.offset - 1))
            a.store64(.at(rbx, C.chainSite), rcx)
            exitWith(.chain, rip: c.target)
        }
        translator.spare.giveBack(misses: &misses, fails: &fails, chains: &chains)
    }

    /// Instruction `index` onwards did not run: give their budget back, interpret at `rip`.
    private mutating func interpreterExit(index: Int, rip: UInt64, dirty: UInt16) {
        storeDirty(dirty)
        a.addImm(budget, Int32(count - index))
        exitWith(.interpret, rip: rip)
    }

    // MARK: Instructions

    /// MUL/IMUL/DIV/IDIV r/m (16/32/64-bit) on host RDX:RAX loaded from the guest's.
    /// DIV and IDIV first rule out #DE — a zero divisor, a quotient too large — leaving
    /// such cases (and IDIV of a dividend that is not RAX sign-extended) to the
    /// interpreter; they keep RFLAGS as they were, as the interpreter does.
    mutating func multiplyDivide(_ i: Instr, _ p: TranslationPlan, index: Int, rip: UInt64) {
        let rdx = HostReg.rdx
        let size = Int(i.osize), w = i.rexW
        let ext: Int
        guard case let .ext(e) = p.regField else { return }
        ext = e
        if p.memorySize != 0 {
            address(i, next: rip &+ UInt64(i.length), segment: true)
            translate(size: size, write: false, index: index, rip: rip)
        }
        var operand: HostOperand = p.rmGuest.map { .reg(host[$0]) } ?? .at(rsi)
        let divide = ext >= 6
        var restore = false
        if divide {
            if flagsLive { a.saveFlags(at: C.flags); flagsLive = false; restore = true }
            if case .mem = operand {
                // The divisor into RCX (zero-extended), so the checks and DIV read it once.
                switch size {
                case 8: a.mov64(rcx, operand)
                case 4: a.mov32(rcx, operand)
                default: a.instruction(HostOpcode(0x0F, 0xB7), w: false, reg: rcx, rm: operand)  // movzx ecx, word
                }
                operand = .reg(rcx)
            }
        }
        a.mov64(rax, .reg(host[0]))
        a.mov64(rdx, .reg(host[2]))
        if divide {
            guard case let .reg(d) = operand else { return }
            func sized(_ opcode: HostOpcode, reg: Int, rm: HostOperand) {
                if size == 2 { a.byte(0x66) }
                a.instruction(opcode, w: w, reg: reg, rm: rm)
            }
            sized(HostOpcode(0x85), reg: d, rm: .reg(d))                          // test divisor, divisor
            fails.append(PendingFail(jump: a.jccForward(0x4), index: index, rip: rip, dirty: dirty))  // jz
            if ext == 6 {
                sized(HostOpcode(0x39), reg: d, rm: .reg(rdx))                    // cmp rdx, divisor
                fails.append(PendingFail(jump: a.jccForward(0x3), index: index, rip: rip, dirty: dirty))  // jae: quotient too large
            } else {
                // RDX must be RAX's sign (the usual CQO; IDIV), and MIN / -1 overflows.
                switch size {
                case 8: a.mov64(rdi, .reg(rax)); a.bytes(0x48, 0xC1, 0xFF, 0x3F)      // sar rdi, 63
                case 4: a.mov32(rdi, .reg(rax)); a.bytes(0xC1, 0xFF, 0x1F)            // sar edi, 31
                default: a.instruction(HostOpcode(0x0F, 0xBF), w: false, reg: rdi, rm: .reg(rax)); a.bytes(0xC1, 0xFF, 0x0F)  // movsx edi, ax; sar edi, 15
                }
                sized(HostOpcode(0x39), reg: rdi, rm: .reg(rdx))                  // cmp rdx, sign
                fails.append(PendingFail(jump: a.jccForward(0x5), index: index, rip: rip, dirty: dirty))  // jne
                sized(HostOpcode(0x83), reg: 7, rm: .reg(d)); a.byte(0xFF)        // cmp divisor, -1
                let notMinusOne = a.jccForward(0x5)
                a.movImm(rdi, size == 8 ? 1 << 63 : size == 4 ? 0x8000_0000 : 0x8000)
                sized(HostOpcode(0x39), reg: rdi, rm: .reg(rax))                  // cmp rax, MIN
                fails.append(PendingFail(jump: a.jccForward(0x4), index: index, rip: rip, dirty: dirty))  // je
                a.bind(notMinusOne)
            }
        }
        if size == 2 { a.byte(0x66) }
        a.instruction(HostOpcode(0xF7), w: w, reg: ext, rm: operand)
        a.mov64(host[0], .reg(rax))
        a.mov64(host[2], .reg(rdx))
        if restore { a.restoreFlags(from: C.flags); flagsLive = true }
    }

    enum PushedValue { case register(Int), constant(UInt64, via: Int) }

    /// Stores `value` at RSP-8 (through the inline TLB), then moves RSP.
    mutating func push(_ value: PushedValue, index: Int, rip: UInt64) {
        let sp = host[4]
        a.lea(rsi, .at(sp, -8))
        translate(size: 8, write: true, index: index, rip: rip)
        switch value {
        case let .register(h):
            a.store64(.at(rsi), h)
        case let .constant(v, scratch):
            a.movImm(scratch, v)
            a.store64(.at(rsi), scratch)
        }
        a.lea(sp, .at(sp, -8))
    }

    /// Emits instruction `index` (at `rip`, `i`, planned as `p`).
    mutating func emit(_ i: Instr, _ p: TranslationPlan, index: Int, rip: UInt64) {
        let next = rip &+ UInt64(i.length)
        switch p.kind {
        case .native:
            if p.memorySize != 0 {
                address(i, next: next, segment: true)
                translate(size: p.memorySize, write: p.memoryWrite, index: index, rip: rip)
            }
            if p.usesCL { a.mov32(rcx, .reg(host[1])) }
            if i.opsize16 { a.byte(0x66) }
            if p.prefixF3 { a.byte(0xF3) }
            let reg: Int
            switch p.regField {
            case let .guest(g): reg = host[g]
            case let .ext(e): reg = e
            }
            let rm: HostOperand = p.rmGuest.map { .reg(host[$0]) } ?? .at(rsi)
            a.instruction(p.opcode, w: i.rexW, reg: reg, rm: rm, forceREX: p.byteRegisters)
            if p.immediateSize > 0 { a.immediate(i.imm, size: p.immediateSize) }
        case .lea:
            address(i, next: next, segment: false)
            guard case let .guest(g) = p.regField else { return }
            switch i.osize {
            case 8: a.mov64(host[g], .reg(rsi))
            case 4: a.mov32(host[g], .reg(rsi))
            default: a.byte(0x66); a.instruction(HostOpcode(0x89), w: false, reg: rsi, rm: .reg(host[g]))
            }
        case .movImmediate:
            guard case let .guest(g) = p.regField else { return }
            let h = host[g]
            let byteForm = p.byteRegisters
            if i.opsize16 && !byteForm { a.byte(0x66) }
            var rex: UInt8 = 0x40
            if i.osize == 8 && !byteForm { rex |= 8 }
            if h >= 8 { rex |= 1 }
            if rex != 0x40 || byteForm { a.byte(rex) }
            a.byte((byteForm ? 0xB0 : 0xB8) + UInt8(h & 7))
            a.immediate(i.imm, size: byteForm ? 1 : Int(i.osize))
        case .bswap:
            guard case let .guest(g) = p.regField else { return }
            let h = host[g]
            var rex: UInt8 = 0x40
            if i.osize == 8 { rex |= 8 }
            if h >= 8 { rex |= 1 }
            if rex != 0x40 { a.byte(rex) }
            a.bytes(0x0F, 0xC8 + UInt8(h & 7))
        case .nop:
            break
        case .multiplyDivide:
            multiplyDivide(i, p, index: index, rip: rip)
        case .extendAccumulator:
            let h = host[0]
            switch i.osize {
            case 8: a.instruction(HostOpcode(0x63), w: true, reg: h, rm: .reg(h))                     // movsxd
            case 4: a.instruction(HostOpcode(0x0F, 0xBF), w: false, reg: h, rm: .reg(h))              // movsx r32, r16
            default: a.byte(0x66); a.instruction(HostOpcode(0x0F, 0xBE), w: false, reg: h, rm: .reg(h), forceREX: true)
            }
        case .signExtendIntoDX:
            let ha = host[0], hd = host[2]
            switch i.osize {
            case 8: a.movImm(rcx, 63); a.sarx(hd, .reg(ha), count: rcx, w: true)
            case 4: a.movImm(rcx, 31); a.sarx(hd, .reg(ha), count: rcx, w: false)
            default:
                a.instruction(HostOpcode(0x0F, 0xBF), w: false, reg: rax, rm: .reg(ha))              // movsx eax, ax'
                a.movImm(rcx, 31)
                a.sarx(rax, .reg(rax), count: rcx, w: false)
                a.byte(0x66); a.instruction(HostOpcode(0x89), w: false, reg: rax, rm: .reg(hd))       // mov dx', ax
            }
        case .push:
            guard case let .guest(g) = p.regField else { return }
            push(.register(host[g]), index: index, rip: rip)
        case .pushImmediate:
            push(.constant(i.imm, via: rax), index: index, rip: rip)
        case .pop:
            guard case let .guest(g) = p.regField else { return }
            let sp = host[4]
            a.mov64(rsi, .reg(sp))
            translate(size: 8, write: false, index: index, rip: rip)
            a.lea(sp, .at(sp, 8))
            a.mov64(host[g], .at(rsi))
        case let .jcc(cc, target):
            if target == blockRip || next == blockRip {
                // A loop: its back edge stays in host registers; the other edge leaves.
                let looping = a.jccForward(target == blockRip ? cc : cc ^ 1)
                let live = flagsLive
                leave(to: target == blockRip ? next : target)
                a.bind(looping)
                flagsLive = live
                loopBack()
                break
            }
            if flagsLive { a.saveFlags(at: C.flags) }
            storeDirty(dirty | p.written)
            let taken = a.jccForward(cc)
            jump(to: next)
            a.bind(taken)
            jump(to: target)
        case let .jmp(target):
            leave(to: target)
        case let .call(target):
            push(.constant(next, via: rax), index: index, rip: rip)
            dirty |= 1 << 4
            leave(to: target)
        case .ret:
            let sp = host[4]
            a.mov64(rsi, .reg(sp))
            translate(size: 8, write: false, index: index, rip: rip)
            saveFlagsIfLive()
            a.mov64(rax, .at(rsi))
            checkCanonical(index: index, rip: rip)
            a.lea(sp, .at(sp, 8))
            dirty |= 1 << 4
            storeDirty(dirty)
            a.jmp(bufferOffset: translator.lookup)
        case .jmpIndirect, .callIndirect:
            if let g = p.rmGuest {
                saveFlagsIfLive()
                a.mov64(rax, .reg(host[g]))
            } else {
                address(i, next: next, segment: true)
                translate(size: 8, write: false, index: index, rip: rip)
                saveFlagsIfLive()
                a.mov64(rax, .at(rsi))
            }
            checkCanonical(index: index, rip: rip)
            if case .callIndirect = p.kind {
                a.store64(.at(rbx, C.rip), rax)  // the push's TLB lookup needs RAX
                push(.constant(next, via: rcx), index: index, rip: rip)
                dirty |= 1 << 4
                a.mov64(rax, .at(rbx, C.rip))
            }
            storeDirty(dirty)
            a.jmp(bufferOffset: translator.lookup)
        }
        dirty |= p.written
        if p.writesFlags { flagsLive = true }
    }
}

/// Host register per guest register, inline (a heap array per block would be an allocation
/// per translation).
struct GuestRegisterMap {
    private var slots = SIMD16<Int8>(repeating: -1)
    subscript(guest: Int) -> Int {
        get { Int(slots[guest]) }
        set { slots[guest] = Int8(newValue) }
    }
}

/// Storage the translator lends each block's emitter and takes back, so translating a
/// block allocates nothing once the arrays have grown.
struct TranslatorScratch {
    typealias PlannedInstruction = (Instr, TranslationPlan, UInt64)
    private var plans: [PlannedInstruction] = []
    private var misses: [BlockEmitter.PendingMiss] = []
    private var fails: [BlockEmitter.PendingFail] = []
    private var chains: [BlockEmitter.PendingChain] = []

    mutating func takePlans() -> [PlannedInstruction] { defer { plans = [] }; return plans }
    mutating func takeMisses() -> [BlockEmitter.PendingMiss] { defer { misses = [] }; return misses }
    mutating func takeFails() -> [BlockEmitter.PendingFail] { defer { fails = [] }; return fails }
    mutating func takeChains() -> [BlockEmitter.PendingChain] { defer { chains = [] }; return chains }

    mutating func giveBack(plans p: inout [PlannedInstruction]) {
        p.removeAll(keepingCapacity: true)
        swap(&plans, &p)
    }
    mutating func giveBack(misses m: inout [BlockEmitter.PendingMiss], fails f: inout [BlockEmitter.PendingFail],
                           chains c: inout [BlockEmitter.PendingChain]) {
        m.removeAll(keepingCapacity: true); swap(&misses, &m)
        f.removeAll(keepingCapacity: true); swap(&fails, &f)
        c.removeAll(keepingCapacity: true); swap(&chains, &c)
    }
}

extension CPU {
    /// Translates the block at `rip` (guest-physical `gpa`); nil when its first instruction
    /// must be interpreted.
    func translateBlock(_ t: BlockTranslator, rip: UInt64, gpa: UInt64) -> BlockTranslator.Block? {
        if !t.hasRoom {
            t.reset()
            flushTranslatorCaches()
        }
        let page = gpa >> 12
        let mark = CodePages.markCode(codeGens, Int(page))
        // Cached write permissions to this page would bypass the code-write check.
        if mark.newlyMarked { dropTranslatorWrites(toPage: Int(page)) }
        let gen = mark.generation

        var plans = t.spare.takePlans()
        defer { t.spare.giveBack(plans: &plans) }
        var used: UInt16 = 0
        var r = rip, g = gpa
        var endedByBranch = false
        var endedByUnsupported = false
        while plans.count < BlockTranslator.maxBlockInstructions && g >> 12 == page {
            var w = FetchWindow()
            fillWindow(&w, rip: r, gpa: g)
            var ins = Instr()
            do throws(Fault) { try decode(w, into: &ins) } catch { endedByUnsupported = true; break }
            if Int(g & 0xFFF) + Int(ins.length) > 0x1000 { endedByUnsupported = true; break }
            guard let plan = TranslationPlan.make(ins, rip: r, sharedMemory: t.sharedMemory) else { endedByUnsupported = true; break }
            let u = used | plan.used
            if u.nonzeroBitCount > BlockTranslator.cacheRegisters.count { break }
            used = u
            plans.append((ins, plan, r))
            r &+= UInt64(ins.length)
            g &+= UInt64(ins.length)
            if plan.endsBlock { endedByBranch = true; break }
        }
        if plans.isEmpty { return nil }

        let loops = plans.last.map { last -> Bool in
            switch last.1.kind {
            case let .jcc(_, target): return target == rip || last.2 &+ UInt64(last.0.length) == rip
            case let .jmp(target): return target == rip
            default: return false
            }
        } ?? false
        let written = plans.reduce(UInt16(0)) { $0 | $1.1.written }
        var e = BlockEmitter(translator: t, used: used, count: plans.count, loopsWriting: loops ? written : nil)
        e.prologue(rip: rip, frame: page, gen: gen, restoreFlags: Self.flagsLiveOnEntry(plans.lazy.map(\.1)))
        for (k, (ins, plan, at)) in plans.enumerated() { e.emit(ins, plan, index: k, rip: at) }
        if !endedByBranch {
            if endedByUnsupported { e.leaveToInterpreter(at: r) } else { e.leave(to: r) }
        }
        e.finish()
        let entry = t.commit(e.a)
        let block = BlockTranslator.Block(rip: rip, gen: gen, entry: entry, chainedEntry: entry + e.chainedEntry)
        t.blocks[gpa] = block
        return block
    }

    /// Whether the guest flags must be in host RFLAGS when the block starts: the first
    /// instruction touching them reads them, or writes only some of them while the result
    /// is still needed — by a later reader, at the block's end (its successors), or at an
    /// instruction that may leave the block early (an exception there shows the guest its
    /// RFLAGS). Before the first flag writer, an early exit finds the flags in the context.
    static func flagsLiveOnEntry(_ plans: some BidirectionalCollection<TranslationPlan>) -> Bool {
        var live = true
        var needed = false
        for p in plans.reversed() {
            let liveAfter = live
            if p.readsFlags {
                live = true
            } else if p.writesFlags && !p.partialFlags {
                live = false
            }
            if p.readsFlags || p.writesFlags { needed = p.readsFlags || (p.partialFlags && liveAfter) }
            if p.mayLeaveEarly { live = true }
        }
        return needed
    }
}
