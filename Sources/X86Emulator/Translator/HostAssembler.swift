/// Host x86-64 registers by encoding number.
enum HostReg {
    static let rax = 0, rcx = 1, rdx = 2, rbx = 3, rsp = 4, rbp = 5, rsi = 6, rdi = 7
    static let r8 = 8, r9 = 9, r10 = 10, r11 = 11, r12 = 12, r13 = 13, r14 = 14, r15 = 15
}

/// A host operand in ModRM position: a register or `[base + index*2^scale + disp]`.
enum HostOperand {
    case reg(Int)
    case mem(base: Int?, index: Int?, scale: Int, disp: Int32)

    static func at(_ base: Int, _ disp: Int32 = 0) -> HostOperand { .mem(base: base, index: nil, scale: 0, disp: disp) }
}

/// A forward jump whose rel32 is filled in once the target is placed.
struct HostLabel { var offset: Int }

/// One or two opcode bytes, held inline: a plan per guest instruction carries one, and an
/// array there would be a heap allocation per instruction translated.
struct HostOpcode {
    private var first: UInt8
    private var second: UInt8
    private var count: UInt8

    init(_ b: UInt8) { first = b; second = 0; count = 1 }
    init(_ b0: UInt8, _ b1: UInt8) { first = b0; second = b1; count = 2 }

    static let none = HostOpcode(0x90)

    func emit(into a: inout HostAssembler) {
        a.byte(first)
        if count == 2 { a.byte(second) }
    }
}

/// Emits host machine code straight into the translator's writable code mapping (no
/// intermediate array: translating a block allocates nothing). Only the encodings the
/// block translator needs; every one is spelled out so the generated code can be read
/// against the SDM.
struct HostAssembler {
    /// Where `position` 0 is: the writable mapping at `origin`.
    private let start: UnsafeMutableRawPointer
    /// Bytes that may be written from `start` (the rest of the buffer).
    private let room: Int
    /// Where in the code buffer `start` is (for jumps to shared stubs).
    let origin: Int
    private(set) var position = 0

    /// `start`: the writable mapping at buffer offset `origin`, with `room` bytes after it.
    init(start: UnsafeMutableRawPointer, room: Int, origin: Int) {
        self.start = start
        self.room = room
        self.origin = origin
    }

    mutating func byte(_ b: UInt8) {
        // A block is bounded (`BlockTranslator.blockReserve`); overrunning it is a translator bug.
        precondition(position < room, "translated block overran the code buffer")
        start.storeBytes(of: b, toByteOffset: position, as: UInt8.self)
        position += 1
    }
    mutating func bytes(_ b0: UInt8, _ b1: UInt8) { byte(b0); byte(b1) }
    mutating func bytes(_ b0: UInt8, _ b1: UInt8, _ b2: UInt8) { byte(b0); byte(b1); byte(b2) }
    mutating func bytes(_ b0: UInt8, _ b1: UInt8, _ b2: UInt8, _ b3: UInt8) { byte(b0); byte(b1); byte(b2); byte(b3) }
    /// Longer fixed sequences (the shared stubs, assembled once).
    mutating func longSequence(_ bs: UInt8...) { for b in bs { byte(b) } }
    mutating func imm32(_ v: Int32) {
        precondition(position + 4 <= room, "translated block overran the code buffer")
        start.storeBytes(of: v.littleEndian, toByteOffset: position, as: Int32.self)
        position += 4
    }
    mutating func imm64(_ v: UInt64) {
        precondition(position + 8 <= room, "translated block overran the code buffer")
        start.storeBytes(of: v.littleEndian, toByteOffset: position, as: UInt64.self)
        position += 8
    }
    mutating func immediate(_ v: UInt64, size: Int) {
        switch size {
        case 8: imm64(v)
        case 4: imm32(Int32(truncatingIfNeeded: v))
        case 2: byte(UInt8(truncatingIfNeeded: v)); byte(UInt8(truncatingIfNeeded: v >> 8))
        default: byte(UInt8(truncatingIfNeeded: v))
        }
    }

    /// REX (when needed or forced), then ModRM/SIB/displacement for `reg` and `rm`.
    /// `opcode` goes between them (legacy prefixes are the caller's).
    mutating func instruction(_ opcode: HostOpcode, w: Bool, reg: Int, rm: HostOperand, forceREX: Bool = false) {
        var rex: UInt8 = 0x40
        if w { rex |= 8 }
        if reg >= 8 { rex |= 4 }
        switch rm {
        case let .reg(r): if r >= 8 { rex |= 1 }
        case let .mem(base, index, _, _):
            if let b = base, b >= 8 { rex |= 1 }
            if let x = index, x >= 8 { rex |= 2 }
        }
        if rex != 0x40 || forceREX { byte(rex) }
        opcode.emit(into: &self)
        modrm(reg: reg, rm: rm)
    }

    mutating func modrm(reg: Int, rm: HostOperand) {
        let r = UInt8(reg & 7) << 3
        switch rm {
        case let .reg(x):
            byte(0xC0 | r | UInt8(x & 7))
        case let .mem(base, index, scale, disp):
            guard let b = base else {
                // [index*s + disp32] or [disp32]: SIB with no base.
                byte(0x04 | r)
                byte(UInt8(scale) << 6 | UInt8((index ?? 4) & 7) << 3 | 5)
                imm32(disp)
                return
            }
            let mod: UInt8 = disp == 0 && b & 7 != 5 ? 0 : (Int32(Int8(truncatingIfNeeded: disp)) == disp ? 0x40 : 0x80)
            if index != nil || b & 7 == 4 {
                byte(mod | r | 4)
                byte(UInt8(scale) << 6 | UInt8((index ?? 4) & 7) << 3 | UInt8(b & 7))
            } else {
                byte(mod | r | UInt8(b & 7))
            }
            if mod == 0x40 { byte(UInt8(bitPattern: Int8(truncatingIfNeeded: disp))) }
            if mod == 0x80 { imm32(disp) }
        }
    }

    // MARK: Moves (none of these touch RFLAGS)

    mutating func mov64(_ dst: Int, _ src: HostOperand) { instruction(HostOpcode(0x8B), w: true, reg: dst, rm: src) }
    mutating func store64(_ dst: HostOperand, _ src: Int) { instruction(HostOpcode(0x89), w: true, reg: src, rm: dst) }
    mutating func mov32(_ dst: Int, _ src: HostOperand) { instruction(HostOpcode(0x8B), w: false, reg: dst, rm: src) }
    mutating func store16(_ dst: HostOperand, _ src: Int) { byte(0x66); instruction(HostOpcode(0x89), w: false, reg: src, rm: dst) }
    mutating func load16(_ dst: Int, _ src: HostOperand) { byte(0x66); instruction(HostOpcode(0x8B), w: false, reg: dst, rm: src) }
    mutating func lea(_ dst: Int, _ src: HostOperand, w: Bool = true) { instruction(HostOpcode(0x8D), w: w, reg: dst, rm: src) }

    /// `mov r64, imm` in its shortest flag-free form.
    mutating func movImm(_ dst: Int, _ v: UInt64) {
        if v <= 0xFFFF_FFFF {
            if dst >= 8 { byte(0x41) }
            byte(0xB8 + UInt8(dst & 7)); imm32(Int32(bitPattern: UInt32(v)))
        } else if Int64(bitPattern: v) >= Int64(Int32.min) && Int64(bitPattern: v) < 0 {
            instruction(HostOpcode(0xC7), w: true, reg: 0, rm: .reg(dst)); imm32(Int32(truncatingIfNeeded: Int64(bitPattern: v)))
        } else {
            byte(dst >= 8 ? 0x49 : 0x48); byte(0xB8 + UInt8(dst & 7)); imm64(v)
        }
    }

    /// `sub r64, imm32` / `add r64, imm32` (these do set RFLAGS).
    mutating func subImm(_ r: Int, _ v: Int32) { instruction(HostOpcode(0x81), w: true, reg: 5, rm: .reg(r)); imm32(v) }
    mutating func addImm(_ r: Int, _ v: Int32) { instruction(HostOpcode(0x81), w: true, reg: 0, rm: .reg(r)); imm32(v) }

    /// `not r64` (flag-free).
    mutating func not64(_ r: Int) { instruction(HostOpcode(0xF7), w: true, reg: 2, rm: .reg(r)) }

    /// `pext dst, src, [mask]` (BMI2, flag-free): VEX.LZ.F3.0F38.W1 F5 /r.
    mutating func pext(_ dst: Int, _ src: Int, mask: HostOperand) { vex0F38(0xF5, pp: 2, w: true, reg: dst, vvvv: src, rm: mask) }

    mutating func vex0F38(_ op: UInt8, pp: UInt8, w: Bool, reg: Int, vvvv: Int, rm: HostOperand) {
        var b: UInt8 = 1, x: UInt8 = 1
        switch rm {
        case let .reg(r): if r >= 8 { b = 0 }
        case let .mem(base, index, _, _):
            if let bb = base, bb >= 8 { b = 0 }
            if let xx = index, xx >= 8 { x = 0 }
        }
        let r: UInt8 = reg >= 8 ? 0 : 1
        byte(0xC4)
        byte(r << 7 | x << 6 | b << 5 | 0x02)
        byte((w ? 0x80 : 0) | UInt8(~vvvv & 0xF) << 3 | pp)
        byte(op)
        modrm(reg: reg, rm: rm)
    }

    /// `pext dst32, src32, [mask]` (flag-free).
    mutating func pext32(_ dst: Int, _ src: Int, mask: HostOperand) { vex0F38(0xF5, pp: 2, w: false, reg: dst, vvvv: src, rm: mask) }

    /// `sarx dst, src, count` (BMI2, flag-free): VEX.LZ.F3.0F38 F7 /r.
    mutating func sarx(_ dst: Int, _ src: HostOperand, count: Int, w: Bool) { vex0F38(0xF7, pp: 2, w: w, reg: dst, vvvv: count, rm: src) }

    // MARK: Flags

    /// Guest arithmetic flags to `[rbx+offset]` as (OF byte, LAHF byte). Clobbers RAX.
    mutating func saveFlags(at offset: Int32) {
        byte(0x9F)                                   // lahf
        bytes(0x0F, 0x90, 0xC0)                      // seto al
        store16(.at(HostReg.rbx, offset), HostReg.rax)
    }

    /// The reverse of `saveFlags`: OF from `add al, 0x7f`, the rest from SAHF. Clobbers RAX.
    mutating func restoreFlags(from offset: Int32) {
        load16(HostReg.rax, .at(HostReg.rbx, offset))
        bytes(0x04, 0x7F)                            // add al, 0x7f  (OF = al was 1)
        byte(0x9E)                                   // sahf
    }

    // MARK: Control flow

    /// `jmp rel32` to a label placed later.
    mutating func jmpForward() -> HostLabel { byte(0xE9); imm32(0); return HostLabel(offset: position - 4) }
    /// `jcc rel32` (cc = condition nibble) to a label placed later.
    mutating func jccForward(_ cc: UInt8) -> HostLabel { bytes(0x0F, 0x80 | cc); imm32(0); return HostLabel(offset: position - 4) }
    /// Points `label` at the current position.
    mutating func bind(_ label: HostLabel) { patch(label, to: position) }
    mutating func patch(_ label: HostLabel, to target: Int) {
        let rel = Int32(target - (label.offset + 4))
        (start + label.offset).storeBytes(of: rel.littleEndian, as: Int32.self)
    }
    /// `jmp rel32` to an already placed position.
    mutating func jmp(to target: Int) { byte(0xE9); imm32(Int32(target - (position + 4))) }
    /// `jmp rel32` / `jcc rel32` to an offset in the code buffer (a shared stub).
    mutating func jmp(bufferOffset target: Int) { byte(0xE9); imm32(Int32(target - (origin + position + 4))) }
    mutating func jcc(_ cc: UInt8, bufferOffset target: Int) { bytes(0x0F, 0x80 | cc); imm32(Int32(target - (origin + position + 4))) }
}
