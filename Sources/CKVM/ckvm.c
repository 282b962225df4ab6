#define _GNU_SOURCE
#include "ckvm.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <sched.h>
#include <linux/sockios.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

static int rc(int r) { return r < 0 ? -errno : r; }

int ckvm_open(const char *path) { return rc(open(path, O_RDWR | O_CLOEXEC)); }
int ckvm_close(int fd) { return rc(close(fd)); }

int ckvm_get_api_version(int kvm_fd) { return rc(ioctl(kvm_fd, KVM_GET_API_VERSION, 0)); }
int ckvm_check_extension(int fd, int capability) { return rc(ioctl(fd, KVM_CHECK_EXTENSION, capability)); }
int ckvm_create_vm(int kvm_fd) { return rc(ioctl(kvm_fd, KVM_CREATE_VM, 0)); }
int ckvm_get_vcpu_mmap_size(int kvm_fd) { return rc(ioctl(kvm_fd, KVM_GET_VCPU_MMAP_SIZE, 0)); }

int ckvm_get_supported_cpuid(int kvm_fd, struct kvm_cpuid_entry2 *entries, int max) {
    struct kvm_cpuid2 *c = calloc(1, sizeof(*c) + (size_t)max * sizeof(*entries));
    if (!c) return -ENOMEM;
    c->nent = (uint32_t)max;
    int r = rc(ioctl(kvm_fd, KVM_GET_SUPPORTED_CPUID, c));
    if (r >= 0) {
        memcpy(entries, c->entries, c->nent * sizeof(*entries));
        r = (int)c->nent;
    }
    free(c);
    return r;
}

int ckvm_create_vcpu(int vm_fd, int id) { return rc(ioctl(vm_fd, KVM_CREATE_VCPU, id)); }

int ckvm_set_user_memory_region(int vm_fd, uint32_t slot, uint32_t flags, uint64_t gpa,
                                uint64_t size, void *host) {
    struct kvm_userspace_memory_region r = {
        .slot = slot, .flags = flags, .guest_phys_addr = gpa,
        .memory_size = size, .userspace_addr = (uint64_t)(uintptr_t)host,
    };
    return rc(ioctl(vm_fd, KVM_SET_USER_MEMORY_REGION, &r));
}

int ckvm_get_dirty_log(int vm_fd, uint32_t slot, void *bitmap) {
    struct kvm_dirty_log d = { .slot = slot, .dirty_bitmap = bitmap };
    return rc(ioctl(vm_fd, KVM_GET_DIRTY_LOG, &d));
}

int ckvm_set_tss_addr(int vm_fd, unsigned long addr) { return rc(ioctl(vm_fd, KVM_SET_TSS_ADDR, addr)); }

int ckvm_run(int vcpu_fd) { return rc(ioctl(vcpu_fd, KVM_RUN, 0)); }

int ckvm_get_regs(int fd, struct kvm_regs *r) { return rc(ioctl(fd, KVM_GET_REGS, r)); }
int ckvm_set_regs(int fd, const struct kvm_regs *r) { return rc(ioctl(fd, KVM_SET_REGS, r)); }
int ckvm_get_sregs(int fd, struct kvm_sregs *s) { return rc(ioctl(fd, KVM_GET_SREGS, s)); }
int ckvm_set_sregs(int fd, const struct kvm_sregs *s) { return rc(ioctl(fd, KVM_SET_SREGS, s)); }
int ckvm_get_fpu(int fd, struct kvm_fpu *f) { return rc(ioctl(fd, KVM_GET_FPU, f)); }
int ckvm_set_fpu(int fd, const struct kvm_fpu *f) { return rc(ioctl(fd, KVM_SET_FPU, f)); }

static struct kvm_msrs *msr_buffer(int count) {
    return calloc(1, sizeof(struct kvm_msrs) + (size_t)count * sizeof(struct kvm_msr_entry));
}

int ckvm_get_msrs(int fd, const uint32_t *indices, uint64_t *values, int count) {
    struct kvm_msrs *m = msr_buffer(count);
    if (!m) return -ENOMEM;
    m->nmsrs = (uint32_t)count;
    for (int i = 0; i < count; i++) m->entries[i].index = indices[i];
    int r = rc(ioctl(fd, KVM_GET_MSRS, m));
    for (int i = 0; r > 0 && i < r; i++) values[i] = m->entries[i].data;
    free(m);
    return r;
}

int ckvm_set_msrs(int fd, const uint32_t *indices, const uint64_t *values, int count) {
    struct kvm_msrs *m = msr_buffer(count);
    if (!m) return -ENOMEM;
    m->nmsrs = (uint32_t)count;
    for (int i = 0; i < count; i++) {
        m->entries[i].index = indices[i];
        m->entries[i].data = values[i];
    }
    int r = rc(ioctl(fd, KVM_SET_MSRS, m));
    free(m);
    return r;
}

int ckvm_set_cpuid2(int fd, const struct kvm_cpuid_entry2 *entries, int count) {
    struct kvm_cpuid2 *c = calloc(1, sizeof(*c) + (size_t)count * sizeof(*entries));
    if (!c) return -ENOMEM;
    c->nent = (uint32_t)count;
    memcpy(c->entries, entries, (size_t)count * sizeof(*entries));
    int r = rc(ioctl(fd, KVM_SET_CPUID2, c));
    free(c);
    return r;
}

int ckvm_interrupt(int fd, uint32_t vector) {
    struct kvm_interrupt i = { .irq = vector };
    return rc(ioctl(fd, KVM_INTERRUPT, &i));
}

void *ckvm_mmap_run(int vcpu_fd, size_t size) {
    void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu_fd, 0);
    return p == MAP_FAILED ? NULL : p;
}

int ckvm_munmap(void *addr, size_t size) { return rc(munmap(addr, size)); }

int ckvm_memfd_create(const char *name) { return rc((int)syscall(SYS_memfd_create, name, MFD_CLOEXEC)); }

void *ckvm_mmap_shared(int fd, size_t size, int writable) {
    int prot = PROT_READ | (writable ? PROT_WRITE : 0);
    void *p = mmap(NULL, size, prot, MAP_SHARED, fd, 0);
    return p == MAP_FAILED ? NULL : p;
}

int ckvm_userfaultfd(int flags) { return rc((int)syscall(SYS_userfaultfd, flags)); }

int ckvm_reference_io_loop(int vcpu_fd, struct kvm_run *run, uint16_t exit_port,
                           uint64_t *io_exits, uint32_t *exit_value) {
    uint64_t n = 0;
    for (;;) {
        if (ioctl(vcpu_fd, KVM_RUN, 0) < 0) {
            if (errno == EINTR) continue;
            *io_exits = n;
            return -errno;
        }
        if (run->exit_reason != KVM_EXIT_IO) {
            *io_exits = n;
            return (int)run->exit_reason;
        }
        uint8_t *data = (uint8_t *)run + run->io.data_offset;
        if (run->io.direction == KVM_EXIT_IO_OUT && run->io.port == exit_port) {
            uint32_t v = 0;
            memcpy(&v, data, run->io.size);
            *exit_value = v;
            *io_exits = n;
            return 0;
        }
        // Reads see all ones, as from an empty bus (so a UART poll finds THRE set).
        if (run->io.direction == KVM_EXIT_IO_IN) memset(data, 0xFF, (size_t)run->io.size * run->io.count);
        n++;
    }
}

static void kick_handler(int signo) { (void)signo; }

int ckvm_install_kick_handler(int signo) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = kick_handler;  // no SA_RESTART: KVM_RUN must return EINTR
    sigemptyset(&sa.sa_mask);
    return rc(sigaction(signo, &sa, NULL));
}

void ckvm_set_thread_name(const char *name) {
    char buf[16];
    strncpy(buf, name, sizeof buf - 1);
    buf[sizeof buf - 1] = 0;
    pthread_setname_np(pthread_self(), buf);
}

int ckvm_unblock_signal(int signo) {
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, signo);
    return -pthread_sigmask(SIG_UNBLOCK, &set, NULL);
}

int ckvm_eventfd(void) { return rc(eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)); }

int64_t ckvm_eventfd_take(int fd) {
    uint64_t v = 0;
    ssize_t n = read(fd, &v, sizeof v);
    return n == (ssize_t)sizeof v ? (int64_t)v : (n < 0 && errno == EAGAIN ? 0 : -errno);
}

int ckvm_eventfd_signal(int fd) {
    uint64_t one = 1;
    return write(fd, &one, sizeof one) == (ssize_t)sizeof one ? 0 : -errno;
}

int ckvm_ioeventfd(int vm_fd, uint64_t address, uint32_t length, int event_fd, uint64_t datamatch, int deassign) {
    struct kvm_ioeventfd e;
    memset(&e, 0, sizeof e);
    e.addr = address;
    e.len = length;
    e.fd = event_fd;
    e.datamatch = datamatch;
    e.flags = KVM_IOEVENTFD_FLAG_DATAMATCH | (deassign ? KVM_IOEVENTFD_FLAG_DEASSIGN : 0);
    return rc(ioctl(vm_fd, KVM_IOEVENTFD, &e));
}

int ckvm_discard_range(int memfd, void *mapping, uint64_t offset, uint64_t length) {
    /* Free the backing pages (the memfd hole reads as zeros), then drop this mapping's
     * page-table entries so the memory really returns to the host. */
    if (fallocate(memfd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)offset, (off_t)length) != 0) return -errno;
    if (madvise((char *)mapping + offset, length, MADV_DONTNEED) != 0) return -errno;
    return 0;
}

int64_t ckvm_allocated_bytes(int fd) {
    struct stat st;
    if (fstat(fd, &st) != 0) return -errno;
    return (int64_t)st.st_blocks * 512;
}

/* ---- userfaultfd: write protection (copy-on-write snapshots) and missing pages (lazy restore) ---- */

int ckvm_uffd_open(int want_wp) {
    int fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
    if (fd < 0) return -errno;
    struct uffdio_api api = { .api = UFFD_API, .features = want_wp ? UFFD_FEATURE_WP_HUGETLBFS_SHMEM : 0 };
    if (ioctl(fd, UFFDIO_API, &api) != 0) { int e = errno; close(fd); return -e; }
    return fd;
}

int ckvm_uffd_register(int fd, void *addr, uint64_t len, int wp, int missing) {
    struct uffdio_register r = { .range = { .start = (uint64_t)addr, .len = len },
                                 .mode = (wp ? UFFDIO_REGISTER_MODE_WP : 0) | (missing ? UFFDIO_REGISTER_MODE_MISSING : 0) };
    return ioctl(fd, UFFDIO_REGISTER, &r) == 0 ? 0 : -errno;
}

int ckvm_uffd_unregister(int fd, void *addr, uint64_t len) {
    struct uffdio_range r = { .start = (uint64_t)addr, .len = len };
    return ioctl(fd, UFFDIO_UNREGISTER, &r) == 0 ? 0 : -errno;
}

int ckvm_uffd_writeprotect(int fd, void *addr, uint64_t len, int protect) {
    struct uffdio_writeprotect w = { .range = { .start = (uint64_t)addr, .len = len },
                                     .mode = protect ? UFFDIO_WRITEPROTECT_MODE_WP : 0 };
    return ioctl(fd, UFFDIO_WRITEPROTECT, &w) == 0 ? 0 : -errno;
}

int ckvm_uffd_copy(int fd, void *dst, const void *src, uint64_t len) {
    struct uffdio_copy c = { .dst = (uint64_t)dst, .src = (uint64_t)src, .len = len, .mode = 0 };
    if (ioctl(fd, UFFDIO_COPY, &c) == 0) return 0;
    return errno == EEXIST ? 0 : -errno;  /* another thread resolved it first */
}

int ckvm_uffd_wake(int fd, void *addr, uint64_t len) {
    struct uffdio_range r = { .start = (uint64_t)addr, .len = len };
    return ioctl(fd, UFFDIO_WAKE, &r) == 0 ? 0 : -errno;
}

int ckvm_uffd_next_fault(int fd, int stop_fd, int timeout_ms, uint64_t *address, int *is_write, int *is_wp) {
    struct pollfd p[2] = { { .fd = fd, .events = POLLIN }, { .fd = stop_fd, .events = POLLIN } };
    for (;;) {
        int n = poll(p, stop_fd >= 0 ? 2 : 1, timeout_ms);
        if (n < 0) { if (errno == EINTR) continue; return -errno; }
        if (n == 0) return 0;
        if (stop_fd >= 0 && p[1].revents) return 2;
        struct uffd_msg m;
        ssize_t r = read(fd, &m, sizeof m);
        if (r < 0) { if (errno == EAGAIN || errno == EINTR) continue; return -errno; }
        if (r != (ssize_t)sizeof m || m.event != UFFD_EVENT_PAGEFAULT) continue;
        *address = m.arg.pagefault.address;
        *is_write = (m.arg.pagefault.flags & UFFD_PAGEFAULT_FLAG_WRITE) != 0;
        *is_wp = (m.arg.pagefault.flags & UFFD_PAGEFAULT_FLAG_WP) != 0;
        return 1;
    }
}

/* ---- page deduplication ---- */

int ckvm_map_private_page(void *address, int store_fd, uint64_t store_offset) {
    void *p = mmap(address, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_FIXED, store_fd, (off_t)store_offset);
    return p == MAP_FAILED ? -errno : 0;
}

int ckvm_map_shared_page(void *address, int fd, uint64_t offset) {
    void *p = mmap(address, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, fd, (off_t)offset);
    return p == MAP_FAILED ? -errno : 0;
}

int ckvm_punch_hole(int fd, uint64_t offset, uint64_t length) {
    return fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)offset, (off_t)length) == 0 ? 0 : -errno;
}

int ckvm_pagemap_entries(const void *address, uint64_t count, uint64_t *entries) {
    int fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
    if (fd < 0) return -errno;
    off_t off = (off_t)((uint64_t)address / 4096 * 8);
    size_t want = (size_t)count * 8, got = 0;
    while (got < want) {
        ssize_t n = pread(fd, (char *)entries + got, want - got, off + (off_t)got);
        if (n < 0) { if (errno == EINTR) continue; int e = errno; close(fd); return -e; }
        if (n == 0) break;
        got += (size_t)n;
    }
    close(fd);
    return got == want ? 0 : -EIO;
}

int ckvm_setns_net(int fd) {
    return setns(fd, CLONE_NEWNET) == 0 ? 0 : -errno;
}

int ckvm_socket_unsent_bytes(int fd) {
    int n = 0;
    return ioctl(fd, SIOCOUTQ, &n) == 0 ? n : -errno;
}
