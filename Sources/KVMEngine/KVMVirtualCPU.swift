import CHost
import CKVM
import Synchronization
import VirtCore
#if canImport(Glibc)
import Glibc
#endif

/// One KVM vCPU: its fd and the shared `kvm_run` page.
// SAFETY: the run page and pending-read state belong to the thread calling run(); kicks from
// other threads go through the atomic thread handle under `kickLock` and immediate_exit.
public final class KVMVirtualCPU: ReferenceRunLoop, ExternalInterruptInput, @unchecked Sendable {
    /// Signal used to knock a vCPU thread out of KVM_RUN.
    static let kickSignal = SIGUSR1
    private static let kickHandlerInstalled: Bool = { ckvm_install_kick_handler(KVMVirtualCPU.kickSignal) == 0 }()

    public let id: Int
    let vm: KVMVirtualMachine
    let fd: Int32
    private let runPage: UnsafeMutablePointer<kvm_run>
    private let hypercallPort: UInt16

    /// Where the value of the pending read goes (set by the last exit).
    private enum PendingRead { case none, port(UnsafeMutablePointer<UInt8>, Int), mmio(UnsafeMutablePointer<UInt8>, Int) }
    private var pendingRead = PendingRead.none
    /// Registers fetched for the last hypercall exit, so its result can be written back.
    private var hypercallRegs = kvm_regs()
    /// pthread of the thread inside `run()`, for kicks (0 = none). Cleared under `kickLock`,
    /// which a kick holds while it signals, as `run()` returns: a kick never signals a thread
    /// that has left — one that has ended (signalling a dead pthread_t is undefined), or a
    /// caller's thread gone on to other work, whose next system call the signal would
    /// interrupt. Between runs a kick sets immediate_exit, which the next KVM_RUN honours.
    private let runningThread = Atomic<UInt>(0)
    private let kickLock = Mutex(())
    /// The thread on which the kick signal was last unblocked (touched by the running thread only).
    private var kickSignalUnblockedOn: UInt = 0
    /// Set by `requestExit`: `run()` returns `.interrupted` (kicks for interrupts don't).
    private let exitRequested = Atomic<Bool>(false)
    private let pending = PendingInterrupts()
    /// An ExtINT request (the 8259's INTR through LINT0): its vector comes from the
    /// controller's acknowledge at injection.
    private let externalRequest = Atomic<Bool>(false)
    private var externalController: (any ExternalInterruptController)?

    init(vm: KVMVirtualMachine, id: Int) throws(KVMError) {
        _ = Self.kickHandlerInstalled
        self.vm = vm
        self.id = id
        self.hypercallPort = KVMEngine.hypercallPort
        let fd = try KVMError.check(ckvm_create_vcpu(vm.fd, Int32(id)), "KVM_CREATE_VCPU")
        guard let page = ckvm_mmap_run(fd, vm.system.vcpuMmapSize) else {
            let err = errno
            close(fd)
            throw .ioctlFailed(operation: "mmap of kvm_run", errno: err)
        }
        self.fd = fd
        self.runPage = page.assumingMemoryBound(to: kvm_run.self)
        var cpuid = vm.cpuid
        let rc = ckvm_set_cpuid2(fd, &cpuid, Int32(cpuid.count))
        if rc < 0 {
            ckvm_munmap(page, vm.system.vcpuMmapSize)
            close(fd)
            throw .ioctlFailed(operation: "KVM_SET_CPUID2", errno: -rc)
        }
    }

    deinit {
        ckvm_munmap(runPage, vm.system.vcpuMmapSize)
        close(fd)
    }

    // MARK: Running

    public func run() throws(VCPUError) -> VMExit {
        let me = UInt(pthread_self())
        if kickSignalUnblockedOn != me {
            // First run on this thread: let the kick signal interrupt KVM_RUN here.
            _ = host_unblock_signal(Self.kickSignal)
            kickSignalUnblockedOn = me
        }
        runningThread.store(me, ordering: .releasing)
        defer { kickLock.withLock { _ in runningThread.store(0, ordering: .releasing) } }
        while true {
            if interruptWaits { try offerInterrupt() }
            let rc = ckvm_run(fd)
            if rc < 0 {
                guard -rc == EINTR || -rc == EAGAIN else { throw .hostCallFailed(operation: "KVM_RUN", errno: -rc) }
                ckvm_run_set_immediate_exit(runPage, 0)
                // A kick only to deliver an interrupt is not an exit for the VMM.
                if exitRequested.exchange(false, ordering: .acquiring) { return .interrupted }
                continue
            }
            if ckvm_run_exit_reason(runPage) == KVM_EXIT_IRQ_WINDOW_OPEN { continue }
            return try decodeExit()
        }
    }

    /// Without an in-kernel irqchip the VMM is the interrupt controller: inject when the
    /// guest can take an interrupt now, else ask KVM to exit as soon as it can.
    /// An ExtINT request is acknowledged only here, as the vector goes in.
    private func offerInterrupt() throws(VCPUError) {
        if ckvm_run_ready_for_interrupt(runPage) != 0 {
            let injected = pending.takeHighest()
            if let vector = injected ?? takeExternalInterrupt() {
                let rc = ckvm_interrupt(fd, UInt32(vector))
                if rc < 0 {
                    if let injected { pending.post(injected) }
                    throw .hostCallFailed(operation: "KVM_INTERRUPT", errno: -rc)
                }
            }
        }
        ckvm_run_request_interrupt_window(runPage, interruptWaits ? 1 : 0)
    }

    private func takeExternalInterrupt() -> UInt8? {
        guard externalRequest.load(ordering: .acquiring), let controller = externalController else { return nil }
        return controller.acknowledgeExternalInterrupt(vcpu: id)
    }

    private var interruptWaits: Bool { !pending.isEmpty || externalRequest.load(ordering: .relaxed) }

    public func injectInterrupt(vector: UInt8) {
        pending.post(vector)
        kick()
    }

    public func setExternalInterruptController(_ controller: (any ExternalInterruptController)?) { externalController = controller }
    public func setExternalInterruptRequest(_ asserted: Bool) {
        externalRequest.store(asserted, ordering: .releasing)
        if asserted { kick() }
    }

    public var hasPendingInterrupt: Bool { interruptWaits }

    public var interruptsEnabled: Bool { ckvm_run_if_flag(runPage) != 0 }

    private func decodeExit() throws(VCPUError) -> VMExit {
        let r = runPage
        switch Int32(ckvm_run_exit_reason(r)) {
        case KVM_EXIT_IO:
            let port = ckvm_run_io_port(r)
            let size = Int(ckvm_run_io_size(r))
            let count = ckvm_run_io_count(r)
            let data = ckvm_run_io_data(r)!
            let isWrite = ckvm_run_io_direction(r) == UInt8(KVM_EXIT_IO_OUT)
            if count != 1 {
                pendingRead = isWrite ? .none : .port(data, size * Int(count))
                let bytes = isWrite ? [UInt8](UnsafeBufferPointer(start: data, count: size * Int(count))) : []
                return .stringPortIO(port: port, size: UInt8(size), direction: isWrite ? .write : .read, count: count, data: bytes)
            }
            if isWrite {
                pendingRead = .none
                var value: UInt32 = 0
                memcpy(&value, data, size)
                if port == hypercallPort { return try hypercallExit() }
                return .portIO(PortAccess(port: port, size: UInt8(size), direction: .write, value: value))
            }
            pendingRead = .port(data, size)
            return .portIO(PortAccess(port: port, size: UInt8(size), direction: .read))
        case KVM_EXIT_MMIO:
            let len = Int(ckvm_run_mmio_length(r))
            let data = ckvm_run_mmio_data(r)!
            let address = ckvm_run_mmio_address(r)
            if ckvm_run_mmio_is_write(r) != 0 {
                pendingRead = .none
                var value: UInt64 = 0
                memcpy(&value, data, min(len, 8))
                return .mmio(MMIOAccess(address: address, size: UInt8(len), direction: .write, value: value))
            }
            pendingRead = .mmio(data, len)
            return .mmio(MMIOAccess(address: address, size: UInt8(len), direction: .read))
        case KVM_EXIT_HLT:
            return .halt
        case KVM_EXIT_SHUTDOWN:
            return .shutdown
        case KVM_EXIT_FAIL_ENTRY:
            return .failEntry(hardwareReason: ckvm_run_fail_entry_reason(r))
        case KVM_EXIT_INTERNAL_ERROR:
            let n = min(ckvm_run_internal_ndata(r), 16)
            let data = (0..<n).map { ckvm_run_internal_data(r, $0) }
            return .internalError(suberror: ckvm_run_internal_suberror(r), data: data, instructionBytes: instructionBytesAtRIP())
        case KVM_EXIT_SYSTEM_EVENT:
            return .systemEvent(type: ckvm_run_system_event_type(r))
        case KVM_EXIT_INTR:
            return .interrupted
        case let other:
            return .unknown(reason: UInt32(other))
        }
    }

    private func hypercallExit() throws(VCPUError) -> VMExit {
        let rc = ckvm_get_regs(fd, &hypercallRegs)
        if rc < 0 { throw .hostCallFailed(operation: "KVM_GET_REGS", errno: -rc) }
        let g = hypercallRegs
        return .hypercall(Hypercall(number: g.rax & 0xFFFF_FFFF, arg0: g.rdi, arg1: g.rsi, arg2: g.rdx, arg3: g.r10, rbx: g.rbx, rcx: g.rcx))
    }

    /// The bytes at the guest's RIP, found through its own page tables (best effort).
    private func instructionBytesAtRIP() -> [UInt8] {
        var regs = kvm_regs()
        var sregs = kvm_sregs()
        guard ckvm_get_regs(fd, &regs) >= 0, ckvm_get_sregs(fd, &sregs) >= 0 else { return [] }
        if sregs.cr0 & 0x8000_0000 == 0 { // paging off: linear = physical
            return (try? vm.memory.read(at: regs.rip, count: 15)) ?? []
        }
        return PageTableWalker.readVirtual(regs.rip, count: 15, cr3: sregs.cr3, memory: vm.memory)
    }

    public func completeRead(value: UInt64) {
        var v = value.littleEndian
        switch pendingRead {
        case let .port(dst, n), let .mmio(dst, n):
            withUnsafeBytes(of: &v) { src in
                for i in 0..<n { dst[i] = i < 8 ? src[i] : 0 }
            }
        case .none:
            break
        }
        pendingRead = .none
    }

    public func completeStringRead(_ bytes: [UInt8]) {
        if case let .port(dst, n) = pendingRead {
            for i in 0..<n { dst[i] = i < bytes.count ? bytes[i] : 0 }
        }
        pendingRead = .none
    }

    public func completeHypercall(result: UInt64) {
        hypercallRegs.rax = result
        // Failure here means the vCPU fd is gone; the next KVM_RUN reports it.
        _ = ckvm_set_regs(fd, &hypercallRegs)
    }

    public func requestExit() {
        exitRequested.store(true, ordering: .releasing)
        kick()
    }

    /// Knocks the vCPU out of KVM_RUN (or makes the next one return at once).
    private func kick() {
        ckvm_run_set_immediate_exit(runPage, 1)
        kickLock.withLock { _ in
            let thread = runningThread.load(ordering: .acquiring)
            if thread != 0 { pthread_kill(pthread_t(thread), Self.kickSignal) }
        }
    }

    /// Runs the guest in the shim's plain C KVM_RUN loop (no Swift between exits) until it
    /// writes `exitPort`: the reference the exit benchmark compares the Swift loop with.
    public func runReferenceLoop(exitPort: UInt16) throws(KVMError) -> (ioExits: UInt64, exitValue: UInt32) {
        var exits: UInt64 = 0
        var value: UInt32 = 0
        let rc = ckvm_reference_io_loop(fd, runPage, exitPort, &exits, &value)
        if rc < 0 { throw .ioctlFailed(operation: "KVM_RUN (reference loop)", errno: -rc) }
        if rc > 0 { throw .ioctlFailed(operation: "reference loop: unexpected exit reason \(rc)", errno: EIO) }
        return (exits, value)
    }

    // MARK: State

    public func getState() throws -> VCPUState {
        var regs = kvm_regs()
        var sregs = kvm_sregs()
        var fpu = kvm_fpu()
        _ = try KVMError.check(ckvm_get_regs(fd, &regs), "KVM_GET_REGS")
        _ = try KVMError.check(ckvm_get_sregs(fd, &sregs), "KVM_GET_SREGS")
        var s = VCPUState()
        s.rax = regs.rax; s.rbx = regs.rbx; s.rcx = regs.rcx; s.rdx = regs.rdx
        s.rsi = regs.rsi; s.rdi = regs.rdi; s.rsp = regs.rsp; s.rbp = regs.rbp
        s.r8 = regs.r8; s.r9 = regs.r9; s.r10 = regs.r10; s.r11 = regs.r11
        s.r12 = regs.r12; s.r13 = regs.r13; s.r14 = regs.r14; s.r15 = regs.r15
        s.rip = regs.rip; s.rflags = regs.rflags
        s.cs = Self.segment(sregs.cs); s.ds = Self.segment(sregs.ds); s.es = Self.segment(sregs.es)
        s.fs = Self.segment(sregs.fs); s.gs = Self.segment(sregs.gs); s.ss = Self.segment(sregs.ss)
        s.tr = Self.segment(sregs.tr); s.ldtr = Self.segment(sregs.ldt)
        s.gdt = DescriptorTableRegister(base: sregs.gdt.base, limit: sregs.gdt.limit)
        s.idt = DescriptorTableRegister(base: sregs.idt.base, limit: sregs.idt.limit)
        s.cr0 = sregs.cr0; s.cr2 = sregs.cr2; s.cr3 = sregs.cr3; s.cr4 = sregs.cr4; s.cr8 = sregs.cr8
        s.efer = sregs.efer; s.apicBase = sregs.apic_base
        var values = [UInt64](repeating: 0, count: MSR.saved.count)
        let n = ckvm_get_msrs(fd, MSR.saved, &values, Int32(MSR.saved.count))
        if n > 0 { for i in 0..<Int(n) { s.msrs[MSR.saved[i]] = values[i] } }
        if ckvm_get_fpu(fd, &fpu) >= 0 { s.fpu = Self.fpuState(fpu) }
        var events = kvm_vcpu_events()
        if ckvm_get_vcpu_events(fd, &events) >= 0 {
            let shadow = Int32(events.interrupt.shadow)
            if shadow & KVM_X86_SHADOW_INT_STI != 0 { s.interruptBlocking.insert(.bySTI) }
            if shadow & KVM_X86_SHADOW_INT_MOV_SS != 0 { s.interruptBlocking.insert(.byMovSS) }
            if events.nmi.masked != 0 { s.interruptBlocking.insert(.nmi) }
        }
        return s
    }

    public func setState(_ s: VCPUState) throws {
        var sregs = kvm_sregs()
        // Start from KVM's view so fields we do not model (interrupt bitmap) stay valid.
        _ = try KVMError.check(ckvm_get_sregs(fd, &sregs), "KVM_GET_SREGS")
        sregs.cs = Self.kvmSegment(s.cs); sregs.ds = Self.kvmSegment(s.ds); sregs.es = Self.kvmSegment(s.es)
        sregs.fs = Self.kvmSegment(s.fs); sregs.gs = Self.kvmSegment(s.gs); sregs.ss = Self.kvmSegment(s.ss)
        sregs.tr = Self.kvmSegment(s.tr); sregs.ldt = Self.kvmSegment(s.ldtr)
        sregs.gdt.base = s.gdt.base; sregs.gdt.limit = s.gdt.limit
        sregs.idt.base = s.idt.base; sregs.idt.limit = s.idt.limit
        sregs.cr0 = s.cr0; sregs.cr2 = s.cr2; sregs.cr3 = s.cr3; sregs.cr4 = s.cr4; sregs.cr8 = s.cr8
        sregs.efer = s.efer; sregs.apic_base = s.apicBase
        _ = try KVMError.check(ckvm_set_sregs(fd, &sregs), "KVM_SET_SREGS")

        var regs = kvm_regs()
        regs.rax = s.rax; regs.rbx = s.rbx; regs.rcx = s.rcx; regs.rdx = s.rdx
        regs.rsi = s.rsi; regs.rdi = s.rdi; regs.rsp = s.rsp; regs.rbp = s.rbp
        regs.r8 = s.r8; regs.r9 = s.r9; regs.r10 = s.r10; regs.r11 = s.r11
        regs.r12 = s.r12; regs.r13 = s.r13; regs.r14 = s.r14; regs.r15 = s.r15
        regs.rip = s.rip; regs.rflags = s.rflags
        _ = try KVMError.check(ckvm_set_regs(fd, &regs), "KVM_SET_REGS")

        if !s.msrs.isEmpty {
            let indices = s.msrs.keys.sorted()
            let values = indices.map { s.msrs[$0]! }
            let n = try KVMError.check(ckvm_set_msrs(fd, indices, values, Int32(indices.count)), "KVM_SET_MSRS")
            guard Int(n) == indices.count else {
                throw KVMError.ioctlFailed(operation: "KVM_SET_MSRS (MSR 0x\(String(indices[Int(n)], radix: 16)) refused)", errno: EINVAL)
            }
        }
        if let f = s.fpu {
            var fpu = Self.kvmFPU(f)
            _ = try KVMError.check(ckvm_set_fpu(fd, &fpu), "KVM_SET_FPU")
        }
        // Start from KVM's events so the injection state it keeps is written back unchanged.
        var events = kvm_vcpu_events()
        if ckvm_get_vcpu_events(fd, &events) >= 0 {
            var shadow: Int32 = 0
            if s.interruptBlocking.contains(.bySTI) { shadow |= KVM_X86_SHADOW_INT_STI }
            if s.interruptBlocking.contains(.byMovSS) { shadow |= KVM_X86_SHADOW_INT_MOV_SS }
            events.interrupt.shadow = UInt8(shadow)
            events.nmi.masked = s.interruptBlocking.contains(.nmi) ? 1 : 0
            events.flags = UInt32(KVM_VCPUEVENT_VALID_SHADOW)
            _ = try KVMError.check(ckvm_set_vcpu_events(fd, &events), "KVM_SET_VCPU_EVENTS")
        } else if !s.interruptBlocking.isEmpty {
            throw KVMError.ioctlFailed(operation: "KVM_GET_VCPU_EVENTS (needed to restore interrupt blocking)", errno: errno)
        }
    }

    static func segment(_ k: kvm_segment) -> SegmentRegister {
        SegmentRegister(selector: k.selector, base: k.base, limit: k.limit, type: k.type, present: k.present != 0,
                        dpl: k.dpl, db: k.db != 0, s: k.s != 0, l: k.l != 0, g: k.g != 0, avl: k.avl != 0,
                        unusable: k.unusable != 0)
    }

    static func kvmSegment(_ s: SegmentRegister) -> kvm_segment {
        var k = kvm_segment()
        k.selector = s.selector; k.base = s.base; k.limit = s.limit; k.type = s.type
        k.present = s.present ? 1 : 0; k.dpl = s.dpl; k.db = s.db ? 1 : 0; k.s = s.s ? 1 : 0
        k.l = s.l ? 1 : 0; k.g = s.g ? 1 : 0; k.avl = s.avl ? 1 : 0; k.unusable = s.unusable ? 1 : 0
        return k
    }

    static func fpuState(_ k: kvm_fpu) -> FPUState {
        var f = FPUState()
        f.fcw = k.fcw; f.fsw = k.fsw; f.ftwx = k.ftwx; f.lastOpcode = k.last_opcode
        f.lastIP = k.last_ip; f.lastDP = k.last_dp; f.mxcsr = k.mxcsr
        f.x87 = withUnsafeBytes(of: k.fpr) { [UInt8]($0) }
        f.xmm = withUnsafeBytes(of: k.xmm) { [UInt8]($0) }
        return f
    }

    static func kvmFPU(_ f: FPUState) -> kvm_fpu {
        var k = kvm_fpu()
        k.fcw = f.fcw; k.fsw = f.fsw; k.ftwx = f.ftwx; k.last_opcode = f.lastOpcode
        k.last_ip = f.lastIP; k.last_dp = f.lastDP; k.mxcsr = f.mxcsr
        withUnsafeMutableBytes(of: &k.fpr) { dst in f.x87.withUnsafeBytes { dst.copyMemory(from: UnsafeRawBufferPointer(rebasing: $0.prefix(dst.count))) } }
        withUnsafeMutableBytes(of: &k.xmm) { dst in f.xmm.withUnsafeBytes { dst.copyMemory(from: UnsafeRawBufferPointer(rebasing: $0.prefix(dst.count))) } }
        return k
    }
}
