import VirtCore

/// FXSAVE/FXRSTOR, XSAVE/XRSTOR/XSAVEOPT (x87 and SSE components, standard format),
/// LDMXCSR/STMXCSR, CLFLUSHOPT and XGETBV/XSETBV.
extension CPU {
    /// XSAVE area size for the components the engine implements (legacy region + header).
    static let xsaveAreaSize = 576

    /// 0F AE with a memory operand, but CLFLUSH (which System.swift runs).
    func executeStateSave(_ i: Instr) throws(Fault) {
        let a = ea(i)
        switch (i.ext, i.rep, i.opsize16) {
        case (0, 0, false), (1, 0, false):  // FXSAVE, FXRSTOR
            if cr0 & (CR.em | CR.ts) != 0 { throw Fault.nm }
            guard a & 15 == 0 else { throw Fault.gp() }
            if i.ext == 0 { try fxsave(a, wide: i.rexW) } else { try fxrstor(a, wide: i.rexW) }
        case (2, 0, false):  // LDMXCSR
            try requireSSE()
            let v = UInt32(try read(a, size: 4))
            guard v & ~FloatingPointState.mxcsrMask == 0 else { throw Fault.gp() }
            fp.mxcsr = v
            fp.inUse |= 2
        case (3, 0, false):  // STMXCSR
            try requireSSE()
            try write(a, UInt64(fp.mxcsr), size: 4)
        case (4, 0, false), (6, 0, false):  // XSAVE, XSAVEOPT (saves everything requested)
            try requireXSAVE()
            guard a & 63 == 0 else { throw Fault.gp() }
            try xsave(a, requested: fp.xcr0 & ((gpr[2] << 32) | (gpr[0] & 0xFFFF_FFFF)), wide: i.rexW)
        case (5, 0, false):  // XRSTOR
            try requireXSAVE()
            guard a & 63 == 0 else { throw Fault.gp() }
            try xrstor(a, requested: fp.xcr0 & ((gpr[2] << 32) | (gpr[0] & 0xFFFF_FFFF)), wide: i.rexW)
        case (7, 0, true):  // CLFLUSHOPT: faults like a byte load, nothing to flush
            _ = try read(a, size: 1)
        default:
            throw Fault.ud
        }
    }

    private func requireXSAVE() throws(Fault) {
        if cr4 & CR.osxsave == 0 { throw Fault.ud }
        if cr0 & CR.ts != 0 { throw Fault.nm }
    }

    /// Checks that every page of [a, a+length) is writable before the first byte is written.
    private func probeWrite(_ a: UInt64, _ length: Int) throws(Fault) {
        let user = cs.dpl == 3
        var page = a & ~0xFFF
        let last = (a &+ UInt64(length - 1)) & ~0xFFF
        while true {
            _ = try translate(max(page, a), write: true, user: user)
            if page == last { break }
            page &+= 0x1000
        }
    }

    /// Writes bytes [from, to) of `image` at `a` (8 at a time; both bounds multiples of 8).
    private func writeImage(_ a: UInt64, _ image: UnsafeRawPointer, from: Int, to: Int) throws(Fault) {
        var k = from
        while k < to {
            try write(a &+ UInt64(k), image.loadUnaligned(fromByteOffset: k, as: UInt64.self), size: 8)
            k += 8
        }
    }

    private func readImage(_ a: UInt64, _ image: UnsafeMutableRawPointer, from: Int, to: Int) throws(Fault) {
        var k = from
        while k < to {
            image.storeBytes(of: try read(a &+ UInt64(k), size: 8), toByteOffset: k, as: UInt64.self)
            k += 8
        }
    }

    private func fxsave(_ a: UInt64, wide: Bool) throws(Fault) {
        try probeWrite(a, 416)
        try withUnsafeTemporaryAllocation(byteCount: 416, alignment: 16) { (buffer) throws(Fault) in
            guard let image = buffer.baseAddress else { return }
            fp.storeX87(image, wide: wide)
            image.storeBytes(of: fp.mxcsr, toByteOffset: 24, as: UInt32.self)
            image.storeBytes(of: FloatingPointState.mxcsrMask, toByteOffset: 28, as: UInt32.self)
            fp.storeXMM(image + 160)
            try writeImage(a, image, from: 0, to: 416)
        }
    }

    private func fxrstor(_ a: UInt64, wide: Bool) throws(Fault) {
        try withUnsafeTemporaryAllocation(byteCount: 416, alignment: 16) { (buffer) throws(Fault) in
            guard let image = buffer.baseAddress else { return }
            try readImage(a, image, from: 0, to: 416)
            let mxcsr = image.load(fromByteOffset: 24, as: UInt32.self)
            guard mxcsr & ~FloatingPointState.mxcsrMask == 0 else { throw Fault.gp() }
            fp.loadX87(image, wide: wide)
            fp.mxcsr = mxcsr
            fp.loadXMM(image + 160)
            fp.inUse |= 3
        }
    }

    private func xsave(_ a: UInt64, requested rfbm: UInt64, wide: Bool) throws(Fault) {
        try probeWrite(a, Self.xsaveAreaSize)
        let header = try read(a &+ 512, size: 8)
        try withUnsafeTemporaryAllocation(byteCount: 416, alignment: 16) { (buffer) throws(Fault) in
            guard let image = buffer.baseAddress else { return }
            fp.storeX87(image, wide: wide)
            image.storeBytes(of: fp.mxcsr, toByteOffset: 24, as: UInt32.self)
            image.storeBytes(of: FloatingPointState.mxcsrMask, toByteOffset: 28, as: UInt32.self)
            fp.storeXMM(image + 160)
            if rfbm & 1 != 0 {
                try writeImage(a, image, from: 0, to: 24)
                try writeImage(a, image, from: 32, to: 160)
            }
            if rfbm & 2 != 0 {
                try writeImage(a, image, from: 24, to: 32)
                try writeImage(a, image, from: 160, to: 416)
            }
        }
        try write(a &+ 512, (header & ~rfbm) | (fp.inUse & rfbm), size: 8)
    }

    private func xrstor(_ a: UInt64, requested rfbm: UInt64, wide: Bool) throws(Fault) {
        let xstateBV = try read(a &+ 512, size: 8)
        let xcompBV = try read(a &+ 520, size: 8)
        guard xstateBV & ~fp.xcr0 == 0, xcompBV == 0 else { throw Fault.gp() }
        for k in stride(from: 528, to: 576, by: 8) {
            guard try read(a &+ UInt64(k), size: 8) == 0 else { throw Fault.gp() }
        }
        try withUnsafeTemporaryAllocation(byteCount: 416, alignment: 16) { (buffer) throws(Fault) in
            guard let image = buffer.baseAddress else { return }
            try readImage(a, image, from: 0, to: 416)
            let mxcsr = image.load(fromByteOffset: 24, as: UInt32.self)
            if rfbm & 2 != 0 {
                guard mxcsr & ~FloatingPointState.mxcsrMask == 0 else { throw Fault.gp() }
                fp.mxcsr = mxcsr
            }
            if rfbm & 1 != 0 {
                if xstateBV & 1 != 0 {
                    fp.loadX87(image, wide: wide)
                    fp.inUse |= 1
                } else {
                    fp.resetX87()
                    for k in 0..<8 { fp.st(k).initializeMemory(as: UInt8.self, repeating: 0, count: 16) }
                    fp.inUse &= ~1
                }
            }
            if rfbm & 2 != 0 {
                if xstateBV & 2 != 0 {
                    fp.loadXMM(image + 160)
                    fp.inUse |= 2
                } else {
                    fp.buffer.initializeMemory(as: UInt8.self, repeating: 0, count: 256)
                    fp.inUse &= ~2
                }
            }
        }
    }

    /// XGETBV (0F 01 D0) and XSETBV (0F 01 D1).
    func extendedControlRegister(_ i: Instr) throws(Fault) {
        guard cr4 & CR.osxsave != 0 else { throw Fault.ud }
        guard gpr[1] & 0xFFFF_FFFF == 0 else { throw Fault.gp() }
        if i.modrm == 0xD0 {
            gpr[0] = fp.xcr0 & 0xFFFF_FFFF
            gpr[2] = fp.xcr0 >> 32
            return
        }
        try requireCPL0()
        let v = (gpr[2] << 32) | (gpr[0] & 0xFFFF_FFFF)
        guard v & 1 != 0, v & ~FloatingPointState.supportedXCR0 == 0 else { throw Fault.gp() }
        fp.xcr0 = v
    }

    /// CPUID leaf 0xD: XSAVE features and sizes for x87 and SSE.
    func xsaveLeaf(_ sub: UInt32) -> (UInt32, UInt32, UInt32, UInt32) {
        switch sub {
        case 0:
            // Supported XCR0 bits; size for the enabled ones; size for all supported ones.
            return (UInt32(FloatingPointState.supportedXCR0), UInt32(Self.xsaveAreaSize), UInt32(Self.xsaveAreaSize), 0)
        case 1:
            return (1, 0, 0, 0)  // XSAVEOPT
        default:
            return (0, 0, 0, 0)  // components 0 and 1 live in the legacy region
        }
    }
}
