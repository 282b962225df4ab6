import VirtCore

/// The x87 and SSE register file of the software CPU. The registers live in one unsafe
/// buffer (no ARC, no bounds checks on the interpreter's path); the control and status
/// words are plain fields.
struct FloatingPointState {
    /// Buffer layout: XMM0–15 (16 bytes each), two 16-byte scratch operands for the host
    /// helper, then the x87 physical registers R0–R7 (16 bytes each, the 80-bit value in
    /// the low 10 bytes; ST(i) is R((TOP + i) mod 8)), then four 16-byte x87 scratch values.
    static let scratchDestination = 256, scratchSource = 272, x87Registers = 288, x87Scratch = 416, size = 480
    /// MXCSR bits a guest may set (with DAZ), as FXSAVE reports in MXCSR_MASK.
    static let mxcsrMask: UInt32 = 0xFFFF
    /// XCR0 components the engine implements: x87 and SSE.
    static let supportedXCR0: UInt64 = 0x3

    let buffer: UnsafeMutableRawPointer
    var mxcsr: UInt32 = 0x1F80
    var fcw: UInt16 = 0x37F
    /// Status word, TOP in bits 11–13.
    var fsw: UInt16 = 0
    /// Bit per physical register R0–R7: set when it holds a value (FXSAVE's abridged tag word).
    var valid: UInt8 = 0
    var fop: UInt16 = 0
    var fip: UInt64 = 0, fdp: UInt64 = 0
    var xcr0: UInt64 = 1
    /// State components modified since they were last put in their initial configuration
    /// (XINUSE, reported in XSAVE's XSTATE_BV).
    var inUse: UInt64 = 0

    init() {
        buffer = .allocate(byteCount: Self.size, alignment: 16)
        buffer.initializeMemory(as: UInt8.self, repeating: 0, count: Self.size)
    }

    /// Freed by the owning CPU's deinit (the struct is copied nowhere else).
    func deallocate() { buffer.deallocate() }

    @inline(__always) var top: Int { Int(fsw >> 11) & 7 }

    /// The 16-byte slot of ST(i).
    @inline(__always) func st(_ i: Int) -> UnsafeMutableRawPointer { buffer + Self.x87Registers + 16 * ((top + i) & 7) }
    @inline(__always) func isValid(_ i: Int) -> Bool { valid & (1 << UInt8((top + i) & 7)) != 0 }

    @inline(__always) func xmm(_ n: Int) -> UnsafeMutableRawPointer { buffer + 16 * n }
    @inline(__always) func low(_ n: Int) -> UInt64 { buffer.load(fromByteOffset: 16 * n, as: UInt64.self) }
    @inline(__always) func high(_ n: Int) -> UInt64 { buffer.load(fromByteOffset: 16 * n + 8, as: UInt64.self) }
    @inline(__always) func set(_ n: Int, low: UInt64, high: UInt64) {
        buffer.storeBytes(of: low, toByteOffset: 16 * n, as: UInt64.self)
        buffer.storeBytes(of: high, toByteOffset: 16 * n + 8, as: UInt64.self)
    }

    /// FNINIT's state (FIP/FDP/FOP cleared too).
    mutating func resetX87() {
        fcw = 0x37F; fsw = 0; valid = 0; fop = 0; fip = 0; fdp = 0
    }

    /// The x87 part of an FXSAVE/XSAVE image (bytes 0–159 but MXCSR), written to `image`.
    func storeX87(_ image: UnsafeMutableRawPointer, wide: Bool) {
        image.storeBytes(of: fcw, toByteOffset: 0, as: UInt16.self)
        image.storeBytes(of: fsw, toByteOffset: 2, as: UInt16.self)
        image.storeBytes(of: valid, toByteOffset: 4, as: UInt8.self)
        image.storeBytes(of: 0, toByteOffset: 5, as: UInt8.self)
        image.storeBytes(of: fop, toByteOffset: 6, as: UInt16.self)
        image.storeBytes(of: wide ? fip : fip & 0xFFFF_FFFF, toByteOffset: 8, as: UInt64.self)
        image.storeBytes(of: wide ? fdp : fdp & 0xFFFF_FFFF, toByteOffset: 16, as: UInt64.self)
        for i in 0..<8 {
            let slot = image + 32 + 16 * i
            slot.copyMemory(from: st(i), byteCount: 10)
            (slot + 10).initializeMemory(as: UInt8.self, repeating: 0, count: 6)
        }
    }

    mutating func loadX87(_ image: UnsafeRawPointer, wide: Bool) {
        fcw = image.loadUnaligned(fromByteOffset: 0, as: UInt16.self)
        fsw = image.loadUnaligned(fromByteOffset: 2, as: UInt16.self)
        valid = image.load(fromByteOffset: 4, as: UInt8.self)
        fop = image.loadUnaligned(fromByteOffset: 6, as: UInt16.self) & 0x7FF
        fip = image.loadUnaligned(fromByteOffset: 8, as: UInt64.self)
        fdp = image.loadUnaligned(fromByteOffset: 16, as: UInt64.self)
        if !wide { fip &= 0xFFFF_FFFF; fdp &= 0xFFFF_FFFF }
        for i in 0..<8 { st(i).copyMemory(from: image + 32 + 16 * i, byteCount: 10) }
    }

    /// XMM0–15 to/from an image at `offset` (160 in FXSAVE and XSAVE).
    func storeXMM(_ image: UnsafeMutableRawPointer) { image.copyMemory(from: buffer, byteCount: 256) }
    func loadXMM(_ image: UnsafeRawPointer) { buffer.copyMemory(from: image, byteCount: 256) }

    // MARK: Engine-neutral state

    func save() -> FPUState {
        var f = FPUState()
        f.fcw = fcw; f.fsw = fsw; f.ftwx = valid; f.lastOpcode = fop
        f.lastIP = fip; f.lastDP = fdp; f.mxcsr = mxcsr; f.xcr0 = xcr0
        var x87 = [UInt8](repeating: 0, count: 128)
        x87.withUnsafeMutableBytes { d in
            guard let base = d.baseAddress else { return }
            for i in 0..<8 { (base + 16 * i).copyMemory(from: st(i), byteCount: 10) }
        }
        f.x87 = x87
        f.xmm = [UInt8](UnsafeRawBufferPointer(start: buffer, count: 256))
        return f
    }

    mutating func load(_ f: FPUState) {
        fcw = f.fcw; fsw = f.fsw; fop = f.lastOpcode; fip = f.lastIP; fdp = f.lastDP
        mxcsr = f.mxcsr & Self.mxcsrMask
        xcr0 = f.xcr0 & Self.supportedXCR0 | 1
        valid = f.ftwx
        f.x87.withUnsafeBytes { s in
            guard let base = s.baseAddress, s.count >= 128 else { return }
            for i in 0..<8 { st(i).copyMemory(from: base + 16 * i, byteCount: 10) }
        }
        f.xmm.withUnsafeBytes { s in
            guard let base = s.baseAddress else { return }
            buffer.copyMemory(from: base, byteCount: min(256, s.count))
        }
        inUse = 3
    }
}

extension CR {
    static let mp: UInt64 = 1 << 1, em: UInt64 = 1 << 2, ne: UInt64 = 1 << 5
    static let osfxsr: UInt64 = 1 << 9, osxmmexcpt: UInt64 = 1 << 10, osxsave: UInt64 = 1 << 18
}

extension Fault {
    /// #NM: device not available (CR0.TS, or CR0.EM for x87).
    static let nm = Fault.exception(vector: 7, errorCode: nil)
    /// #MF: a pending unmasked x87 exception.
    static let mf = Fault.exception(vector: 16, errorCode: nil)
    /// #XM: an unmasked SIMD floating-point exception (with CR4.OSXMMEXCPT).
    static let xm = Fault.exception(vector: 19, errorCode: nil)
}
