// C shim over <linux/kvm.h>, memfd and userfaultfd. Swift cannot call variadic ioctl(2)
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
/// Reads `count` MSRs whose indices are in `indices`; values go to `values`. Returns the
/// number read or -errno.
int ckvm_get_msrs(int vcpu_fd, const uint32_t *indices, uint64_t *values, int count);
int ckvm_set_msrs(int vcpu_fd, const uint32_t *indices, const uint64_t *values, int count);
int ckvm_set_cpuid2(int vcpu_fd, const struct kvm_cpuid_entry2 *entries, int count);
int ckvm_interrupt(int vcpu_fd, uint32_t vector);
/* eventfd (non-blocking, close-on-exec); take returns the count read (0 if none), or -errno. */
int ckvm_eventfd(void);
int64_t ckvm_eventfd_take(int fd);
int ckvm_eventfd_signal(int fd);
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

/// The time-stamp counter (invariant on the hosts we run on); see VirtCore's HostClock.
static inline uint64_t ckvm_rdtsc(void) {
    uint32_t lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((uint64_t)hi << 32) | lo;
}

// Memory
int ckvm_memfd_create(const char *name);
/* Frees [offset, offset+length) of a memfd and drops it from `mapping` (the memfd's
 * mapping at offset 0): the range reads as zeros afterwards and uses no host memory. */
int ckvm_discard_range(int memfd, void *mapping, uint64_t offset, uint64_t length);
/* Bytes of host memory a file (memfd) has allocated, from st_blocks. */
int64_t ckvm_allocated_bytes(int fd);

/* userfaultfd. open: non-blocking fd with the API handshake (want_wp: shmem write
 * protection). register: a range in WP and/or MISSING mode. writeprotect: set or clear
 * (clearing wakes threads waiting on the range). copy: fill a missing range (EEXIST counts
 * as done). next_fault: waits up to timeout_ms (-1: forever) for a page fault on fd or a
 * readable stop_fd; returns 1 with the fault, 2 when stop_fd fired, 0 on timeout, -errno. */
int ckvm_uffd_open(int want_wp);
int ckvm_uffd_register(int fd, void *addr, uint64_t len, int wp, int missing);
int ckvm_uffd_unregister(int fd, void *addr, uint64_t len);
int ckvm_uffd_writeprotect(int fd, void *addr, uint64_t len, int protect);
int ckvm_uffd_copy(int fd, void *dst, const void *src, uint64_t len);
int ckvm_uffd_wake(int fd, void *addr, uint64_t len);
/* Page deduplication: map one page of `store_fd` privately (copy-on-write by the kernel) or
 * shared at `address` (MAP_FIXED); punch a hole in a file; read /proc/self/pagemap entries
 * (bit 63 present, bit 61 file-backed or shared). */
int ckvm_map_private_page(void *address, int store_fd, uint64_t store_offset);
int ckvm_map_shared_page(void *address, int fd, uint64_t offset);
int ckvm_punch_hole(int fd, uint64_t offset, uint64_t length);
int ckvm_pagemap_entries(const void *address, uint64_t count, uint64_t *entries);
int ckvm_uffd_next_fault(int fd, int stop_fd, int timeout_ms, uint64_t *address, int *is_write, int *is_wp);
void *ckvm_mmap_shared(int fd, size_t size, int writable);
int ckvm_userfaultfd(int flags);

/// A plain C KVM_RUN loop: the reference point for `swiftvisor bench exits`. Runs the vCPU
/// until a write to `exit_port` (returns its value in *exit_value) or any exit other than
/// port I/O. Port writes to other ports are counted in *io_exits and otherwise ignored;
/// port reads return all ones. Returns 0 on the exit port, the KVM exit reason (>0) on another
/// exit, or -errno if KVM_RUN fails.
int ckvm_reference_io_loop(int vcpu_fd, struct kvm_run *run, uint16_t exit_port,
                           uint64_t *io_exits, uint32_t *exit_value);

/// Signal used to kick a vCPU thread out of KVM_RUN; installs a no-op handler once.
int ckvm_install_kick_handler(int signo);

/// Unblocks `signo` for the calling thread (threads inherit masks; dispatch workers block all).
int ckvm_unblock_signal(int signo);

/// Names the calling thread (shown by top -H and gdb); truncated to 15 bytes.
void ckvm_set_thread_name(const char *name);

/* Partitions (S12; partition.c): pin the calling thread to `cpus`; the CPUs this
 * process may use (count, or -errno); RLIMIT_MEMLOCK in bytes (-1: unlimited). */
int ckvm_set_thread_affinity(const int *cpus, int count);
int ckvm_get_affinity(int *cpus, int max);
long long ckvm_memlock_limit(void);

/// setns(2) for a network namespace: moves the calling thread into the namespace `fd`
/// refers to. Returns 0 or -errno.
int ckvm_setns_net(int fd);

/// SIOCOUTQ: bytes a stream socket holds that the peer has not acknowledged, or -errno.
int ckvm_socket_unsent_bytes(int fd);

#endif
