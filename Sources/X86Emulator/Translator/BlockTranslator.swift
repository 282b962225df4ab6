import CHost
import Glibc

/// The block shared by the interpreter and translated code: the guest GPRs (the
/// interpreter's `gpr` points here), the flags and budget of the translated code, the TLB
/// it looks up inline and the jump cache it dispatches through. Offsets from RBX.
enum TranslatorContext {
    static let flags: Int32 = 128          // UInt16: OF byte, LAHF byte
    static let budget: Int32 = 136         // Int64: instructions translated code may still run
    static let rip: Int32 = 144
    static let fsBase: Int32 = 152
    static let gsBase: Int32 = 160
    static let missHelper: Int32 = 168     // C function: (context, linear, kind) -> host address or 0
    static let codeGens: Int32 = 176       // CodePages.gens
    static let owner: Int32 = 184          // the CPU, unretained
    static let tlbIndexMask: Int32 = 192   // PEXT mask: linear page number bits that index the TLB
    static let pageNumberMask: Int32 = 200 // PEXT mask: the linear page number
    static let chainSite: Int32 = 208      // host address of the JMP a `.chain` exit wants patched
    static let hasCodeMask: Int32 = 216    // PEXT mask: CodePages.hasCode
    /// Direct-mapped TLB: (read tag, write tag, host address - linear address, address of
    /// the page's CodePages word); tags are linear page numbers, ~0 when empty.
    static let tlb: Int32 = 256
    static let tlbEntries = 1024
    static let tlbEntrySize = 32
    /// Jump cache: (guest RIP, host entry), keyed by a hash of the RIP.
    static let jumpCache: Int32 = tlb + Int32(tlbEntries * tlbEntrySize)
    static let jumpCacheEntries = 4096
    static let size = Int(jumpCache) + 16 * jumpCacheEntries
    /// Non-canonical, so no guest RIP matches an empty slot.
    static let emptyJumpKey: UInt64 = 0x8000_0000_0000_0000
    static let emptyTag: UInt64 = ~0
}

/// Why translated code returned to the dispatcher (in EAX).
enum TranslatorExit: UInt32 {
    /// The jump cache had no block for the RIP now in the context.
    case lookup = 0
    /// The instruction at RIP must be interpreted (unsupported, or its memory access
    /// missed the inline TLB and needs the full path: a fault, MMIO, a page crossing, a
    /// write to a code page).
    case interpret = 1
    /// The block at RIP has more instructions than the budget allows.
    case budget = 2
    /// The block at RIP was translated from code that has since been overwritten.
    case invalid = 3
    /// A direct branch to RIP, on the same guest page, taken for the first time: the JMP
    /// at `chainSite` should go straight to the block at RIP from now on.
    case chain = 4
}

/// Handles a translated memory access that missed the inline TLB: walks, fills the entry
/// when the access may be cached, and returns the host address (0: let the interpreter
/// run the instruction).
private let translatorMissHelper: @convention(c) (UnsafeMutableRawPointer, UInt64, UInt64) -> UInt64 = { context, linear, kind in
    let owner = context.load(fromByteOffset: Int(TranslatorContext.owner), as: UnsafeRawPointer.self)
    return Unmanaged<CPU>.fromOpaque(owner).takeUnretainedValue().translatorMiss(linear: linear, kind: kind)
}

/// A dynamic binary translator from guest x86-64 to host x86-64 (the software engine's
/// fast path; the interpreter remains the reference and runs everything it cannot).
///
/// Blocks are straight-line runs within one guest page, keyed by guest-physical address
/// and guarded by the page's generation in `CodePages`, so writes to code invalidate them
/// exactly as they invalidate decoded instructions. Each block: checks its generation,
/// takes its instruction count from the budget (leaving the rest to the interpreter when
/// too few remain, so the preemption timer stays exact), loads the guest registers it uses
/// into host registers, runs, stores the registers it wrote and leaves: directly into the
/// next block when a direct branch stays on the page (chained on first use; chains need no
/// undoing, because a page's blocks share its generation and TLB changes happen outside
/// translated code, which is re-entered through a full lookup), otherwise through the jump
/// cache. Memory operands go through an inline, flag-preserving lookup of a small TLB
/// (PEXT, LEA, NOT, JRCXZ) filled from the interpreter's page walk.
final class BlockTranslator {
    typealias EnterFunction = @convention(c) (UnsafeMutableRawPointer, UnsafeRawPointer) -> UInt32

    /// Host registers that cache guest registers within a block (callee-saved ones survive
    /// the miss helper; the others are reloaded after it). RAX and RDX stay free for
    /// MUL/DIV's implicit operands.
    static let cacheRegisters = [HostReg.rbp, HostReg.r8, HostReg.r9, HostReg.r10, HostReg.r11,
                                 HostReg.r12, HostReg.r13, HostReg.r14]
    /// Holds the instruction budget while translated code runs (loaded on entry, stored by
    /// the epilogue), so the per-block check touches no memory.
    static let budgetRegister = HostReg.r15
    static let maxBlockInstructions = 128
    /// Code buffer size; when full, every block is dropped and translation starts over.
    let capacity: Int
    /// Room a block may need (128 instructions with their out-of-line stubs).
    static let blockReserve = 256 << 10

    /// Whether this host can run translated code (BMI2 for PEXT/SARX, and executable memory).
    static let hostSupported: Bool = {
        guard let f = fopen("/proc/cpuinfo", "r") else { return false }
        defer { fclose(f) }
        var line = [CChar](repeating: 0, count: 8192)
        while fgets(&line, Int32(line.count), f) != nil {
            let text = String(decoding: line.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
            if text.hasPrefix("flags") { return text.split(separator: " ").contains { $0 == "bmi2" || $0 == "bmi2\n" } }
        }
        return false
    }()

    /// The code buffer, mapped twice from one memfd: `code` read+execute (where blocks
    /// run, and what their addresses refer to) and `writable` read+write (where they are
    /// emitted and chained). No page of the process is writable and executable at once.
    let code: UnsafeMutableRawPointer
    private let writable: UnsafeMutableRawPointer
    private(set) var used = 0
    private var sharedEnd = 0
    private(set) var epilogue = 0
    private(set) var lookup = 0
    let enter: EnterFunction

    struct Block {
        var rip: UInt64
        var gen: UInt32
        /// Offset in the code buffer, or `interpreted`: the first instruction is not translatable.
        var entry: Int
        /// Where chained branches from the same page enter (past the generation check).
        var chainedEntry: Int
        static let interpreted = -1
    }
    // SAFETY: unchecked exclusivity (a hot lookup): one vCPU thread owns the translator.
    @exclusivity(unchecked) var blocks = BlockTable()
    // SAFETY: unchecked exclusivity: only the owning vCPU thread's translateBlock touches it.
    @exclusivity(unchecked) var spare = TranslatorScratch()

    /// Instructions the interpreter runs (where no block can start), by guest RIP, so each
    /// visit costs no page walk and no `blocks` lookup. Direct-mapped; valid as the jump
    /// cache is (emptied with it) while the page's generation holds.
    struct InterpretedAt { var rip: UInt64 = ~0; var gpa: UInt64 = 0; var gen: UInt32 = 0 }
    static let interpretedEntries = 1024
    let interpreted: UnsafeMutablePointer<InterpretedAt>

    /// Statistics.
    private(set) var blocksTranslated: UInt64 = 0
    private(set) var resets: UInt64 = 0
    private(set) var chainsMade: UInt64 = 0

    /// Several vCPUs share the VM's RAM: translated stores check the page's has-code bit
    /// themselves (another vCPU may have made it a code page since the TLB entry was
    /// filled), and XCHG with memory stays interpreted (serialised with LOCK instructions).
    let sharedMemory: Bool

    init?(capacity: Int = 32 << 20, sharedMemory: Bool = false) {
        guard Self.hostSupported, capacity >= 2 * Self.blockReserve else { return nil }
        self.capacity = capacity
        self.sharedMemory = sharedMemory
        let fd = host_memfd_create("swiftvisor-translated-code")
        guard fd >= 0 else { return nil }
        defer { close(fd) }  // the mappings keep the memory
        guard ftruncate(fd, off_t(capacity)) == 0,
              let rw = mmap(nil, capacity, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0), rw != MAP_FAILED else { return nil }
        guard let rx = mmap(nil, capacity, PROT_READ | PROT_EXEC, MAP_SHARED, fd, 0), rx != MAP_FAILED else {
            munmap(rw, capacity)
            return nil
        }
        code = rx
        writable = rw
        var a = HostAssembler(start: rw, room: capacity, origin: 0)
        // enter(context, entry): save callee-saved registers, align the stack for calls, go.
        a.longSequence(0x53, 0x55, 0x41, 0x54, 0x41, 0x55, 0x41, 0x56, 0x41, 0x57)  // push rbx rbp r12 r13 r14 r15
        a.bytes(0x48, 0x83, 0xEC, 0x08)                                    // sub rsp, 8
        a.bytes(0x48, 0x89, 0xFB)                                          // mov rbx, rdi
        a.mov64(Self.budgetRegister, .at(HostReg.rbx, TranslatorContext.budget))
        a.bytes(0xFF, 0xE6)                                                // jmp rsi
        let epilogueAt = a.position
        a.store64(.at(HostReg.rbx, TranslatorContext.budget), Self.budgetRegister)
        a.bytes(0x48, 0x83, 0xC4, 0x08)                                    // add rsp, 8
        a.longSequence(0x41, 0x5F, 0x41, 0x5E, 0x41, 0x5D, 0x41, 0x5C, 0x5D, 0x5B, 0xC3)
        // lookup: RAX = guest RIP; registers stored, flags saved.
        let lookupAt = a.position
        a.store64(.at(HostReg.rbx, TranslatorContext.rip), HostReg.rax)
        a.bytes(0x48, 0x89, 0xC1)                                          // mov rcx, rax
        a.bytes(0x48, 0x89, 0xC2)                                          // mov rdx, rax
        a.bytes(0x48, 0xC1, 0xEA, 0x0C)                                    // shr rdx, 12
        a.bytes(0x48, 0x31, 0xD1)                                          // xor rcx, rdx
        a.bytes(0x81, 0xE1); a.imm32(Int32(TranslatorContext.jumpCacheEntries - 1))  // and ecx, entries-1
        a.bytes(0xC1, 0xE1, 0x04)                                          // shl ecx, 4
        a.instruction(HostOpcode(0x39), w: true, reg: HostReg.rax,
                      rm: .mem(base: HostReg.rbx, index: HostReg.rcx, scale: 0, disp: TranslatorContext.jumpCache))
        let miss = a.jccForward(0x5)                                       // jne miss
        a.instruction(HostOpcode(0xFF), w: false, reg: 4,
                      rm: .mem(base: HostReg.rbx, index: HostReg.rcx, scale: 0, disp: TranslatorContext.jumpCache + 8))
        a.bind(miss)
        a.bytes(0x31, 0xC0)                                                // xor eax, eax (.lookup)
        a.jmp(to: epilogueAt)
        epilogue = epilogueAt
        lookup = lookupAt
        sharedEnd = (a.position + 63) & ~63
        used = sharedEnd
        enter = unsafeBitCast(rx, to: EnterFunction.self)
        interpreted = .allocate(capacity: Self.interpretedEntries)
        interpreted.initialize(repeating: InterpretedAt(), count: Self.interpretedEntries)
    }

    deinit {
        munmap(code, capacity)
        munmap(writable, capacity)
        interpreted.deallocate()
        blocks.deallocate()
    }

    static var missHelperAddress: UInt64 { UInt64(UInt(bitPattern: unsafeBitCast(translatorMissHelper, to: UnsafeRawPointer.self))) }

    /// Room for one more block, or nil when the buffer must be reset first.
    var hasRoom: Bool { capacity - used >= Self.blockReserve }

    /// Forgets every block (the buffer is full).
    func reset() {
        blocks.removeAll()
        used = sharedEnd
        resets &+= 1
    }

    /// Points the `jmp rel32` at host address `site` to `entry` (an offset).
    func chain(site: UInt64, to entry: Int) {
        let siteOffset = Int(site &- UInt64(UInt(bitPattern: code)))
        guard siteOffset >= sharedEnd && siteOffset + 5 <= used, writable.load(fromByteOffset: siteOffset, as: UInt8.self) == 0xE9 else { return }
        let rel = Int32(entry - (siteOffset + 5))
        (writable + siteOffset + 1).storeBytes(of: rel.littleEndian, as: Int32.self)
        chainsMade &+= 1
    }

    /// SWIFTVISOR_TRANSLATOR_DUMP: a file to rewrite with the code buffer after each block.
    private static let dumpPath: String? = getenv("SWIFTVISOR_TRANSLATOR_DUMP").map { String(cString: $0) }

    /// An assembler writing the next block in place (`commit` keeps it).
    func assembler() -> HostAssembler {
        HostAssembler(start: writable + used, room: capacity - used, origin: used)
    }

    /// Keeps the block `a` wrote; returns its offset.
    func commit(_ a: HostAssembler) -> Int {
        let at = a.origin
        precondition(at == used && at + a.position <= capacity)
        used = (at + a.position + 15) & ~15
        blocksTranslated &+= 1
        if let path = Self.dumpPath, let f = fopen(path, "w") {
            fwrite(code, 1, used, f); fclose(f)
        }
        return at
    }
}
