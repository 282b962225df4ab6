// C shim over <linux/kvm.h>. Swift cannot call variadic ioctl(2)
// or see function-like macros, so each ioctl gets a typed wrapper here. Wrappers return
// the ioctl's result, or -errno on failure. No policy lives here.
#ifndef CKVM_H
#define CKVM_H

#include <linux/kvm.h>
#include <linux/userfaultfd.h>
#include <stdint.h>
#include <stddef.h>

int ckvm_open(const char *path);
int ckvm_close(int fd);

// /dev/kvm (system) ioctls
int ckvm_get_api_version(int kvm_fd);
int ckvm_check_extension(int fd, int capability);
int ckvm_create_vm(int kvm_fd);
int ckvm_get_vcpu_mmap_size(int kvm_fd);
/// Fills `entries` with up to `max` supported CPUID entries; returns the count or -errno.
int ckvm_get_supported_cpuid(int kvm_fd, struct kvm_cpuid_entry2 *entries, int max);

// VM ioctls
int ckvm_create_vcpu(int vm_fd, int id);
int ckvm_set_user_memory_region(int vm_fd, uint32_t slot, uint32_t flags, uint64_t gpa,
                                uint64_t size, void *host);
int ckvm_get_dirty_log(int vm_fd, uint32_t slot, void *bitmap);
int ckvm_set_tss_addr(int vm_fd, unsigned long addr);

// vCPU ioctls
int ckvm_run(int vcpu_fd);

int ckvm_get_regs(int vcpu_fd, struct kvm_regs *regs);
int ckvm_set_regs(int vcpu_fd, const struct kvm_regs *regs);
int ckvm_get_sregs(int vcpu_fd, struct kvm_sregs *sregs);
int ckvm_set_sregs(int vcpu_fd, const struct kvm_sregs *sregs);
int ckvm_get_fpu(int vcpu_fd, struct kvm_fpu *fpu);
int ckvm_set_fpu(int vcpu_fd, const struct kvm_fpu *fpu);
int ckvm_get_vcpu_events(int vcpu_fd, struct kvm_vcpu_events *events);
int ckvm_set_vcpu_events(int vcpu_fd, const struct kvm_vcpu_events *events);
/// Reads `count` MSRs whose indices are in `indices`; values go to `values`. Returns the
/// number read or -errno.
int ckvm_get_msrs(int vcpu_fd, const uint32_t *indices, uint64_t *values, int count);
int ckvm_set_msrs(int vcpu_fd, const uint32_t *indices, const uint64_t *values, int count);
int ckvm_set_cpuid2(int vcpu_fd, const struct kvm_cpuid_entry2 *entries, int count);
int ckvm_interrupt(int vcpu_fd, uint32_t vector);
/* KVM_IOEVENTFD on an MMIO address: a guest write of `datamatch` signals event_fd inside
 * the kernel instead of exiting to userspace. */
int ckvm_ioeventfd(int vm_fd, uint64_t address, uint32_t length, int event_fd, uint64_t datamatch, int deassign);
void *ckvm_mmap_run(int vcpu_fd, size_t size);
int ckvm_munmap(void *addr, size_t size);

// kvm_run field access (the struct is a union-heavy kernel ABI; keep it on the C side)
static inline uint32_t ckvm_run_exit_reason(const struct kvm_run *r) { return r->exit_reason; }
static inline void ckvm_run_set_immediate_exit(struct kvm_run *r, uint8_t v) {
    __atomic_store_n(&r->immediate_exit, v, __ATOMIC_SEQ_CST);
}
static inline uint8_t ckvm_run_if_flag(const struct kvm_run *r) { return r->if_flag; }
static inline uint8_t ckvm_run_ready_for_interrupt(const struct kvm_run *r) { return r->ready_for_interrupt_injection; }
static inline void ckvm_run_request_interrupt_window(struct kvm_run *r, uint8_t v) { r->request_interrupt_window = v; }
static inline uint8_t ckvm_run_io_direction(const struct kvm_run *r) { return r->io.direction; }
static inline uint8_t ckvm_run_io_size(const struct kvm_run *r) { return r->io.size; }
static inline uint16_t ckvm_run_io_port(const struct kvm_run *r) { return r->io.port; }
static inline uint32_t ckvm_run_io_count(const struct kvm_run *r) { return r->io.count; }
static inline uint8_t *ckvm_run_io_data(struct kvm_run *r) { return (uint8_t *)r + r->io.data_offset; }
static inline uint64_t ckvm_run_mmio_address(const struct kvm_run *r) { return r->mmio.phys_addr; }
static inline uint32_t ckvm_run_mmio_length(const struct kvm_run *r) { return r->mmio.len; }
static inline uint8_t ckvm_run_mmio_is_write(const struct kvm_run *r) { return r->mmio.is_write; }
static inline uint8_t *ckvm_run_mmio_data(struct kvm_run *r) { return r->mmio.data; }
static inline uint64_t ckvm_run_fail_entry_reason(const struct kvm_run *r) {
    return r->fail_entry.hardware_entry_failure_reason;
}
static inline uint32_t ckvm_run_internal_suberror(const struct kvm_run *r) { return r->internal.suberror; }
static inline uint32_t ckvm_run_internal_ndata(const struct kvm_run *r) { return r->internal.ndata; }
static inline uint64_t ckvm_run_internal_data(const struct kvm_run *r, uint32_t i) {
    return i < 16 ? r->internal.data[i] : 0;
}
static inline uint32_t ckvm_run_system_event_type(const struct kvm_run *r) { return r->system_event.type; }
static inline uint64_t ckvm_run_hw_exit_reason(const struct kvm_run *r) { return r->hw.hardware_exit_reason; }

/// A plain C KVM_RUN loop: the reference point for `swiftvisor bench exits`. Runs the vCPU
/// until a write to `exit_port` (returns its value in *exit_value) or any exit other than
/// port I/O. Port writes to other ports are counted in *io_exits and otherwise ignored;
/// port reads return all ones. Returns 0 on the exit port, the KVM exit reason (>0) on another
/// exit, or -errno if KVM_RUN fails.
int ckvm_reference_io_loop(int vcpu_fd, struct kvm_run *run, uint16_t exit_port,
                           uint64_t *io_exits, uint32_t *exit_value);

/// Signal used to kick a vCPU thread out of KVM_RUN; installs a no-op handler once.
int ckvm_install_kick_handler(int signo);

#endif
