import CKVM
import VirtCore
#if canImport(Glibc)
import Glibc
#endif

/// The engine over Linux KVM: real hardware virtualization.
public struct KVMEngine: Engine {
    /// The doorbell port the guest runtime uses for hypercalls under KVM.
    public static let hypercallPort: UInt16 = 0xF6

    public let system: KVMSystem
    public var name: String { "kvm" }
    public var hypercallMechanism: HypercallMechanism { .portDoorbell(Self.hypercallPort) }

    /// Opens and validates `devicePath`; throws a `KVMError` that says what to fix.
    public init(devicePath: String = "/dev/kvm") throws(KVMError) {
        system = try KVMSystem(path: devicePath)
    }

    public func makeVM(memory: GuestMemory, config: VMConfig) throws -> any VM {
        try makeKVMVM(memory: memory, config: config)
    }

    public func makeKVMVM(memory: GuestMemory, config: VMConfig) throws(KVMError) -> KVMVirtualMachine {
        guard config.vcpuCount >= 1, config.vcpuCount <= system.maxVCPUs else {
            throw .tooManyVCPUs(requested: config.vcpuCount, limit: system.maxVCPUs)
        }
        return try KVMVirtualMachine(system: system, memory: memory, config: config)
    }
}

/// A KVM VM: the VM fd plus guest RAM in memory slot 0.
// SAFETY: the fd and tables are immutable after init; `dirtyLogging` changes only through
// setDirtyLogging, which the VMM calls from one thread at a time (the kernel serialises the ioctl).
public final class KVMVirtualMachine: DirtyPageLogging, NotificationOffload, @unchecked Sendable {
    public let system: KVMSystem
    public let memory: GuestMemory
    public let config: VMConfig
    let fd: Int32
    let cpuid: [kvm_cpuid_entry2]
    private(set) var dirtyLogging = false

    init(system: KVMSystem, memory: GuestMemory, config: VMConfig) throws(KVMError) {
        self.system = system
        self.memory = memory
        self.config = config
        let fd = try KVMError.check(ckvm_create_vm(system.fd), "KVM_CREATE_VM")
        self.fd = fd
        do throws(KVMError) {
            cpuid = try system.supportedCPUID()
            try setMemorySlot(flags: 0)
        } catch {
            close(fd)
            throw error
        }
    }

    deinit { close(fd) }

    private func setMemorySlot(flags: UInt32) throws(KVMError) {
        _ = try KVMError.check(ckvm_set_user_memory_region(fd, 0, flags, 0, memory.size, memory.base),
                               "KVM_SET_USER_MEMORY_REGION")
    }

    public var engineName: String { "kvm" }
    public func makeVCPU(id: Int) throws -> any VCPU { try makeKVMVCPU(id: id) }

    public func makeKVMVCPU(id: Int) throws(KVMError) -> KVMVirtualCPU {
        guard id >= 0, id < config.vcpuCount else { throw .tooManyVCPUs(requested: id + 1, limit: config.vcpuCount) }
        return try KVMVirtualCPU(vm: self, id: id)
    }

    /// Turns KVM's dirty-page logging of guest RAM on or off.
    public func setDirtyLogging(_ enabled: Bool) throws(KVMError) {
        try setMemorySlot(flags: enabled ? UInt32(KVM_MEM_LOG_DIRTY_PAGES) : 0)
        dirtyLogging = enabled
    }

    /// Whether the host can signal eventfds for guest MMIO writes (KVM_CAP_IOEVENTFD).
    public var notificationOffloadAvailable: Bool { system.capability(KVM_CAP_IOEVENTFD) > 0 }

    /// KVM_IOEVENTFD: a guest write of `value` (`length` bytes) to MMIO `address` signals
    /// `eventFD` inside the kernel; the vCPU carries on without an exit to userspace.
    public func assignNotification(address: UInt64, length: UInt32, value: UInt64, eventFD: Int32) throws(KVMError) {
        _ = try KVMError.check(ckvm_ioeventfd(fd, address, length, eventFD, value, 0), "KVM_IOEVENTFD")
    }

    public func deassignNotification(address: UInt64, length: UInt32, value: UInt64, eventFD: Int32) throws(KVMError) {
        _ = try KVMError.check(ckvm_ioeventfd(fd, address, length, eventFD, value, 1), "KVM_IOEVENTFD (deassign)")
    }

    /// Pages written since the last call (KVM_GET_DIRTY_LOG resets the log).
    public func fetchDirtyLog() throws(KVMError) -> DirtyBitmap {
        var bitmap = DirtyBitmap(pageCount: Int(memory.size) / GuestMemory.pageSize)
        let rc = bitmap.withUnsafeMutableWords { ckvm_get_dirty_log(fd, 0, $0.baseAddress) }
        _ = try KVMError.check(rc, "KVM_GET_DIRTY_LOG")
        return bitmap
    }
}
