import CKVM
#if canImport(Glibc)
import Glibc
#endif

/// A capability Swiftvisor checks, with the name shown to users.
public struct KVMCapability: Sendable, Hashable {
    public let name: String
    public let code: Int32
    /// Swiftvisor refuses to start without it.
    public let required: Bool

    public static let all: [KVMCapability] = [
        KVMCapability(name: "KVM_CAP_USER_MEMORY", code: KVM_CAP_USER_MEMORY, required: true),
        KVMCapability(name: "KVM_CAP_EXT_CPUID", code: KVM_CAP_EXT_CPUID, required: true),
        KVMCapability(name: "KVM_CAP_IMMEDIATE_EXIT", code: KVM_CAP_IMMEDIATE_EXIT, required: true),
        KVMCapability(name: "KVM_CAP_NR_VCPUS", code: KVM_CAP_NR_VCPUS, required: false),
        KVMCapability(name: "KVM_CAP_MAX_VCPUS", code: KVM_CAP_MAX_VCPUS, required: false),
        KVMCapability(name: "KVM_CAP_SYNC_MMU", code: KVM_CAP_SYNC_MMU, required: false),
        KVMCapability(name: "KVM_CAP_READONLY_MEM", code: KVM_CAP_READONLY_MEM, required: false),
        KVMCapability(name: "KVM_CAP_IRQCHIP", code: KVM_CAP_IRQCHIP, required: false),
        KVMCapability(name: "KVM_CAP_IOEVENTFD", code: KVM_CAP_IOEVENTFD, required: false),
        KVMCapability(name: "KVM_CAP_IRQFD", code: KVM_CAP_IRQFD, required: false),
        KVMCapability(name: "KVM_CAP_MP_STATE", code: KVM_CAP_MP_STATE, required: false),
        KVMCapability(name: "KVM_CAP_DIRTY_LOG_RING", code: KVM_CAP_DIRTY_LOG_RING, required: false),
        KVMCapability(name: "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2", code: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, required: false),
        KVMCapability(name: "KVM_CAP_XSAVE", code: KVM_CAP_XSAVE, required: false),
        KVMCapability(name: "KVM_CAP_VCPU_EVENTS", code: KVM_CAP_VCPU_EVENTS, required: false),
    ]
}

/// What `swiftvisor host` prints about /dev/kvm.
public struct KVMHostReport: Sendable {
    public var path: String
    public var apiVersion: Int32
    /// KVM_CAP_NR_VCPUS: recommended maximum.
    public var recommendedVCPUs: Int
    /// KVM_CAP_MAX_VCPUS: hard maximum.
    public var maxVCPUs: Int
    public var capabilities: [(capability: KVMCapability, value: Int32)]
}

/// An open /dev/kvm handle, validated: right API version and every required capability.
// SAFETY: immutable after init (an open fd and the values read from it).
public final class KVMSystem: @unchecked Sendable {
    public static let expectedAPIVersion: Int32 = 12

    public let path: String
    let fd: Int32
    public let apiVersion: Int32
    let vcpuMmapSize: Int

    public init(path: String = "/dev/kvm") throws(KVMError) {
        let fd = ckvm_open(path)
        if fd < 0 {
            switch -fd {
            case ENOENT, ENODEV, ENXIO: throw .deviceMissing(path: path)
            case EACCES, EPERM: throw .permissionDenied(path: path)
            default: throw .openFailed(path: path, errno: -fd)
            }
        }
        self.path = path
        self.fd = fd
        do throws(KVMError) {
            let version = try KVMError.check(ckvm_get_api_version(fd), "KVM_GET_API_VERSION")
            guard version == Self.expectedAPIVersion else {
                throw .apiVersionMismatch(found: version, expected: Self.expectedAPIVersion)
            }
            apiVersion = version
            for cap in KVMCapability.all where cap.required && ckvm_check_extension(fd, cap.code) <= 0 {
                throw .missingCapability(name: cap.name)
            }
            vcpuMmapSize = Int(try KVMError.check(ckvm_get_vcpu_mmap_size(fd), "KVM_GET_VCPU_MMAP_SIZE"))
        } catch {
            close(fd)
            throw error
        }
    }

    deinit { close(fd) }

    public func capability(_ code: Int32) -> Int32 { max(0, ckvm_check_extension(fd, code)) }

    public var recommendedVCPUs: Int { Int(capability(KVM_CAP_NR_VCPUS)).nonZeroOr(4) }
    public var maxVCPUs: Int { Int(capability(KVM_CAP_MAX_VCPUS)).nonZeroOr(recommendedVCPUs) }

    public func report() -> KVMHostReport {
        KVMHostReport(path: path, apiVersion: apiVersion, recommendedVCPUs: recommendedVCPUs, maxVCPUs: maxVCPUs,
                      capabilities: KVMCapability.all.map { ($0, capability($0.code)) })
    }

    /// CPUID leaves this KVM can present to a guest.
    func supportedCPUID() throws(KVMError) -> [kvm_cpuid_entry2] {
        var entries = [kvm_cpuid_entry2](repeating: kvm_cpuid_entry2(), count: 256)
        let n = try KVMError.check(ckvm_get_supported_cpuid(fd, &entries, Int32(entries.count)), "KVM_GET_SUPPORTED_CPUID")
        return Array(entries.prefix(Int(n)))
    }
}

extension Int {
    fileprivate func nonZeroOr(_ fallback: Int) -> Int { self == 0 ? fallback : self }
}
