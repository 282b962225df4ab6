/// A segment register as the hardware caches it (selector plus the descriptor's fields).
public struct SegmentRegister: Equatable, Hashable, Sendable {
    public var selector: UInt16
    public var base: UInt64
    public var limit: UInt32
    /// Descriptor type field (4 bits).
    public var type: UInt8
    public var present: Bool
    public var dpl: UInt8
    /// Default operation size (D/B).
    public var db: Bool
    /// Code/data (true) versus system segment (false).
    public var s: Bool
    /// 64-bit code segment.
    public var l: Bool
    public var g: Bool
    public var avl: Bool
    public var unusable: Bool

    public init(selector: UInt16 = 0, base: UInt64 = 0, limit: UInt32 = 0xFFFF, type: UInt8 = 0,
                present: Bool = false, dpl: UInt8 = 0, db: Bool = false, s: Bool = false,
                l: Bool = false, g: Bool = false, avl: Bool = false, unusable: Bool = false) {
        self.selector = selector; self.base = base; self.limit = limit; self.type = type
        self.present = present; self.dpl = dpl; self.db = db; self.s = s; self.l = l; self.g = g
        self.avl = avl; self.unusable = unusable
    }

    /// Flat 64-bit ring-0 code segment.
    public static func code64(selector: UInt16, dpl: UInt8 = 0) -> SegmentRegister {
        SegmentRegister(selector: selector, base: 0, limit: 0xFFFF_FFFF, type: 0xB, present: true,
                        dpl: dpl, db: false, s: true, l: true, g: true)
    }

    /// Flat read/write data segment.
    public static func data(selector: UInt16, dpl: UInt8 = 0) -> SegmentRegister {
        SegmentRegister(selector: selector, base: 0, limit: 0xFFFF_FFFF, type: 0x3, present: true,
                        dpl: dpl, db: true, s: true, l: false, g: true)
    }
}

public struct DescriptorTableRegister: Equatable, Hashable, Sendable {
    public var base: UInt64
    public var limit: UInt16
    public init(base: UInt64 = 0, limit: UInt16 = 0xFFFF) { self.base = base; self.limit = limit }
}

/// Architectural MSR indices the engines save and restore.
public enum MSR {
    public static let efer: UInt32 = 0xC000_0080
    public static let star: UInt32 = 0xC000_0081
    public static let lstar: UInt32 = 0xC000_0082
    public static let cstar: UInt32 = 0xC000_0083
    public static let fmask: UInt32 = 0xC000_0084
    public static let fsBase: UInt32 = 0xC000_0100
    public static let gsBase: UInt32 = 0xC000_0101
    public static let kernelGSBase: UInt32 = 0xC000_0102
    public static let tsc: UInt32 = 0x10
    public static let apicBase: UInt32 = 0x1B
    public static let sysenterCS: UInt32 = 0x174
    public static let sysenterESP: UInt32 = 0x175
    public static let sysenterEIP: UInt32 = 0x176
    public static let pat: UInt32 = 0x277

    /// The MSRs part of `VCPUState` (FS/GS base live in the segment registers).
    public static let saved: [UInt32] = [star, lstar, cstar, fmask, kernelGSBase, sysenterCS, sysenterESP, sysenterEIP, pat, tsc]
}

/// x87/SSE register file, as KVM_GET_FPU reports it.
public struct FPUState: Equatable, Sendable {
    public var fcw: UInt16 = 0x37F
    public var fsw: UInt16 = 0
    public var ftwx: UInt8 = 0
    public var lastOpcode: UInt16 = 0
    public var lastIP: UInt64 = 0
    public var lastDP: UInt64 = 0
    public var mxcsr: UInt32 = 0x1F80
    /// Eight 16-byte x87/MMX registers, 128 bytes.
    public var x87: [UInt8] = [UInt8](repeating: 0, count: 128)
    /// Sixteen 16-byte XMM registers, 256 bytes.
    public var xmm: [UInt8] = [UInt8](repeating: 0, count: 256)
    /// XCR0, the state components XSAVE/XRSTOR cover: a restored kernel's XRSTOR faults
    /// if it comes back narrower than the guest set it (1, x87 only, at reset).
    public var xcr0: UInt64 = 1
    public init() {}
}

/// What keeps a vCPU from taking an interrupt at the next instruction boundary although
/// IF may be set — VMX's interruptibility state, KVM's `kvm_vcpu_events`. It belongs to the
/// saved state: a snapshot taken between `sti` and `hlt` that dropped it would let the
/// restored vCPU take its wake-up interrupt before the `hlt` and then sleep for ever.
public struct InterruptBlocking: OptionSet, Equatable, Sendable {
    public let rawValue: UInt8
    public init(rawValue: UInt8) { self.rawValue = rawValue }
    /// The instruction after STI (which set IF) runs before any interrupt.
    public static let bySTI = InterruptBlocking(rawValue: 1 << 0)
    /// The instruction after MOV SS / POP SS runs before any interrupt or debug trap.
    public static let byMovSS = InterruptBlocking(rawValue: 1 << 1)
    /// An NMI handler runs: no NMI is delivered until the next IRET.
    public static let nmi = InterruptBlocking(rawValue: 1 << 2)
    public static let all: InterruptBlocking = [.bySTI, .byMovSS, .nmi]
    /// nil when `rawValue` has a bit that names no blocking (a corrupt record).
    public init?(exactly rawValue: UInt8) {
        guard rawValue & ~Self.all.rawValue == 0 else { return nil }
        self.init(rawValue: rawValue)
    }
}

/// The architectural state of one vCPU, engine-neutral. Enough to snapshot, migrate,
/// and compare engines.
public struct VCPUState: Equatable, Sendable {
    public var rax: UInt64 = 0, rbx: UInt64 = 0, rcx: UInt64 = 0, rdx: UInt64 = 0
    public var rsi: UInt64 = 0, rdi: UInt64 = 0, rsp: UInt64 = 0, rbp: UInt64 = 0
    public var r8: UInt64 = 0, r9: UInt64 = 0, r10: UInt64 = 0, r11: UInt64 = 0
    public var r12: UInt64 = 0, r13: UInt64 = 0, r14: UInt64 = 0, r15: UInt64 = 0
    public var rip: UInt64 = 0
    public var rflags: UInt64 = 0x2

    public var cs = SegmentRegister(), ds = SegmentRegister(), es = SegmentRegister()
    public var fs = SegmentRegister(), gs = SegmentRegister(), ss = SegmentRegister()
    public var tr = SegmentRegister(), ldtr = SegmentRegister()
    public var gdt = DescriptorTableRegister(), idt = DescriptorTableRegister()

    public var cr0: UInt64 = 0x6000_0010, cr2: UInt64 = 0, cr3: UInt64 = 0, cr4: UInt64 = 0, cr8: UInt64 = 0
    public var efer: UInt64 = 0
    public var apicBase: UInt64 = 0xFEE0_0900

    /// Values of `MSR.saved`, by index.
    public var msrs: [UInt32: UInt64] = [:]
    /// nil where the engine does not model the FPU.
    public var fpu: FPUState?
    public var interruptBlocking: InterruptBlocking = []

    public init() {}

    /// General-purpose registers in encoding order (RAX, RCX, RDX, RBX, RSP, RBP, RSI, RDI, R8–R15).
    public var gprs: [UInt64] {
        get { [rax, rcx, rdx, rbx, rsp, rbp, rsi, rdi, r8, r9, r10, r11, r12, r13, r14, r15] }
        set {
            precondition(newValue.count == 16, "16 general-purpose registers")
            rax = newValue[0]; rcx = newValue[1]; rdx = newValue[2]; rbx = newValue[3]
            rsp = newValue[4]; rbp = newValue[5]; rsi = newValue[6]; rdi = newValue[7]
            r8 = newValue[8]; r9 = newValue[9]; r10 = newValue[10]; r11 = newValue[11]
            r12 = newValue[12]; r13 = newValue[13]; r14 = newValue[14]; r15 = newValue[15]
        }
    }

    /// Current privilege level (CS.DPL in long mode).
    public var cpl: UInt8 { cs.dpl }

    public static let gprNames = ["rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
                                  "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15"]

    /// A multi-line register dump for error reports.
    public var dump: String {
        func hex(_ v: UInt64) -> String {
            let s = String(v, radix: 16)
            return String(repeating: "0", count: max(0, 16 - s.count)) + s
        }
        var lines: [String] = []
        let g = gprs
        for row in 0..<4 {
            lines.append((0..<4).map { i in
                let n = row * 4 + i
                return VCPUState.gprNames[n].padded(to: 3) + "=" + hex(g[n])
            }.joined(separator: " "))
        }
        lines.append("rip=\(hex(rip)) rflags=\(hex(rflags)) cpl=\(cpl)")
        lines.append("cr0=\(hex(cr0)) cr2=\(hex(cr2)) cr3=\(hex(cr3)) cr4=\(hex(cr4)) efer=\(hex(efer))")
        lines.append("cs=\(String(cs.selector, radix: 16)) ss=\(String(ss.selector, radix: 16)) gdt=\(hex(gdt.base))/\(gdt.limit) idt=\(hex(idt.base))/\(idt.limit)")
        return lines.joined(separator: "\n")
    }
}
