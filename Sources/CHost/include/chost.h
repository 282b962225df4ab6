// C shim for the host facilities that are not KVM: memfd and memory discards, eventfd,
// userfaultfd, page maps, the TSC, thread names, affinity and namespaces. Wrappers return
// the call's result, or -errno on failure. No policy lives here.
#ifndef CHOST_H
#define CHOST_H

#include <stdint.h>
#include "host_xts.h"
#include <stddef.h>

#include "lifecycle.h"  // stop signals, fatal faults, cleanup on exit

/* eventfd (non-blocking, close-on-exec); take returns the count read (0 if none), or -errno. */
int host_eventfd(void);
int64_t host_eventfd_take(int fd);
int host_eventfd_signal(int fd);

/// The time-stamp counter (invariant on the hosts we run on); see VirtCore's HostClock.
static inline uint64_t host_rdtsc(void) {
    uint32_t lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((uint64_t)hi << 32) | lo;
}

/// A guest's locked read-modify-write lands in its RAM with one compare-exchange of 1, 2, 4
/// or 8 bytes at `p` (any alignment: x86 locks a split access too); 1 if `expected` was
/// still there and `desired` replaced it.
static inline int host_compare_exchange(void *p, uint64_t expected, uint64_t desired, int size) {
    switch (size) {
    case 1: { uint8_t e = (uint8_t)expected; return __atomic_compare_exchange_n((uint8_t *)p, &e, (uint8_t)desired, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST); }
    case 2: { uint16_t e = (uint16_t)expected; return __atomic_compare_exchange_n((uint16_t *)p, &e, (uint16_t)desired, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST); }
    case 4: { uint32_t e = (uint32_t)expected; return __atomic_compare_exchange_n((uint32_t *)p, &e, (uint32_t)desired, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST); }
    default: { uint64_t e = expected; return __atomic_compare_exchange_n((uint64_t *)p, &e, desired, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST); }
    }
}

// Memory
int host_memfd_create(const char *name);
/* Frees [offset, offset+length) of a memfd and drops it from `mapping` (the memfd's
 * mapping at offset 0): the range reads as zeros afterwards and uses no host memory. */
int host_discard_range(int memfd, void *mapping, uint64_t offset, uint64_t length);
/* Allocates the backing pages of [offset, offset+length) of a mapping ahead of use; 0 or -errno. */
int host_populate_range(void *mapping, uint64_t offset, uint64_t length);
/* Bytes of host memory a file (memfd) has allocated, from st_blocks. */
int64_t host_allocated_bytes(int fd);

/* userfaultfd. open: non-blocking fd with the API handshake (want_wp: shmem write
 * protection). register: a range in WP and/or MISSING mode. writeprotect: set or clear
 * (clearing wakes threads waiting on the range). copy: fill a missing range (EEXIST counts
 * as done). next_fault: waits up to timeout_ms (-1: forever) for a page fault on fd or a
 * readable stop_fd; returns 1 with the fault, 2 when stop_fd fired, 0 on timeout, -errno. */
int host_uffd_open(int want_wp);
int host_uffd_register(int fd, void *addr, uint64_t len, int wp, int missing);
int host_uffd_unregister(int fd, void *addr, uint64_t len);
int host_uffd_writeprotect(int fd, void *addr, uint64_t len, int protect);
int host_uffd_copy(int fd, void *dst, const void *src, uint64_t len);
int host_uffd_wake(int fd, void *addr, uint64_t len);
/* Page deduplication: map one page of `store_fd` privately (copy-on-write by the kernel) or
 * shared at `address` (MAP_FIXED); punch a hole in a file; read /proc/self/pagemap entries
 * (bit 63 present, bit 61 file-backed or shared). */
int host_map_private_page(void *address, int store_fd, uint64_t store_offset);
int host_map_shared_page(void *address, int fd, uint64_t offset);
int host_punch_hole(int fd, uint64_t offset, uint64_t length);
int host_pagemap_entries(const void *address, uint64_t count, uint64_t *entries);
int host_uffd_next_fault(int fd, int stop_fd, int timeout_ms, uint64_t *address, int *is_write, int *is_wp);
void *host_mmap_shared(int fd, size_t size, int writable);
int host_userfaultfd(int flags);

/// Unblocks `signo` for the calling thread (threads inherit masks; dispatch workers block all).
int host_unblock_signal(int signo);

/// Names the calling thread (shown by top -H and gdb); truncated to 15 bytes.
void host_set_thread_name(const char *name);

/* Partitions (S12; partition.c): pin the calling thread to `cpus`; the CPUs this
 * process may use (count, or -errno); RLIMIT_MEMLOCK in bytes (-1: unlimited). */
int host_set_thread_affinity(const int *cpus, int count);
int host_get_affinity(int *cpus, int max);
long long host_memlock_limit(void);

/// setns(2) for a network namespace: moves the calling thread into the namespace `fd`
/// refers to. Returns 0 or -errno.
int host_setns_net(int fd);

/// SIOCOUTQ: bytes a stream socket holds that the peer has not acknowledged, or -errno.
int host_socket_unsent_bytes(int fd);


// CRC-32C (Castagnoli), continuing `crc` (0 to start) over `count` bytes; SSE4.2 where present.
uint32_t host_crc32c(uint32_t crc, const void *data, size_t count);
// 1 when host_crc32c uses the CPU's crc32 instruction.
int host_crc32c_is_hardware(void);
#include "host_sse.h"
#include "host_vcpu_thread.h"  // which vCPU a thread runs

#endif
