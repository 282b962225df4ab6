#define _GNU_SOURCE
#include "chost.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/sockios.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

static int rc(int r) { return r < 0 ? -errno : r; }

int host_memfd_create(const char *name) { return rc((int)syscall(SYS_memfd_create, name, MFD_CLOEXEC)); }

void *host_mmap_shared(int fd, size_t size, int writable) {
    int prot = PROT_READ | (writable ? PROT_WRITE : 0);
    void *p = mmap(NULL, size, prot, MAP_SHARED, fd, 0);
    return p == MAP_FAILED ? NULL : p;
}

int host_userfaultfd(int flags) { return rc((int)syscall(SYS_userfaultfd, flags)); }

void host_set_thread_name(const char *name) {
    char buf[16];
    strncpy(buf, name, sizeof buf - 1);
    buf[sizeof buf - 1] = 0;
    pthread_setname_np(pthread_self(), buf);
}

int host_unblock_signal(int signo) {
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, signo);
    return -pthread_sigmask(SIG_UNBLOCK, &set, NULL);
}

int host_eventfd(void) { return rc(eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)); }

int64_t host_eventfd_take(int fd) {
    uint64_t v = 0;
    ssize_t n = read(fd, &v, sizeof v);
    return n == (ssize_t)sizeof v ? (int64_t)v : (n < 0 && errno == EAGAIN ? 0 : -errno);
}

int host_eventfd_signal(int fd) {
    uint64_t one = 1;
    return write(fd, &one, sizeof one) == (ssize_t)sizeof one ? 0 : -errno;
}

int host_discard_range(int memfd, void *mapping, uint64_t offset, uint64_t length) {
    /* Free the backing pages (the memfd hole reads as zeros), then drop this mapping's
     * page-table entries so the memory really returns to the host. */
    if (fallocate(memfd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)offset, (off_t)length) != 0) return -errno;
    if (madvise((char *)mapping + offset, length, MADV_DONTNEED) != 0) return -errno;
    return 0;
}

int host_populate_range(void *mapping, uint64_t offset, uint64_t length) {
    /* MADV_POPULATE_WRITE (Linux 5.14) allocates the pages without changing their contents;
     * older kernels get the same by a read-modify-write of one byte per page, which is only
     * sound before anything else uses the memory, as the callers ensure. */
#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif
    if (madvise((char *)mapping + offset, length, MADV_POPULATE_WRITE) == 0) return 0;
    if (errno != EINVAL) return -errno;
    volatile char *p = (volatile char *)mapping + offset;
    for (uint64_t at = 0; at < length; at += 4096) p[at] = p[at];
    return 0;
}

int64_t host_allocated_bytes(int fd) {
    struct stat st;
    if (fstat(fd, &st) != 0) return -errno;
    return (int64_t)st.st_blocks * 512;
}

int host_uffd_open(int want_wp) {
    int fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
    if (fd < 0) return -errno;
    struct uffdio_api api = { .api = UFFD_API, .features = want_wp ? UFFD_FEATURE_WP_HUGETLBFS_SHMEM : 0 };
    if (ioctl(fd, UFFDIO_API, &api) != 0) { int e = errno; close(fd); return -e; }
    return fd;
}

int host_uffd_register(int fd, void *addr, uint64_t len, int wp, int missing) {
    struct uffdio_register r = { .range = { .start = (uint64_t)addr, .len = len },
                                 .mode = (wp ? UFFDIO_REGISTER_MODE_WP : 0) | (missing ? UFFDIO_REGISTER_MODE_MISSING : 0) };
    return ioctl(fd, UFFDIO_REGISTER, &r) == 0 ? 0 : -errno;
}

int host_uffd_unregister(int fd, void *addr, uint64_t len) {
    struct uffdio_range r = { .start = (uint64_t)addr, .len = len };
    return ioctl(fd, UFFDIO_UNREGISTER, &r) == 0 ? 0 : -errno;
}

int host_uffd_writeprotect(int fd, void *addr, uint64_t len, int protect) {
    struct uffdio_writeprotect w = { .range = { .start = (uint64_t)addr, .len = len },
                                     .mode = protect ? UFFDIO_WRITEPROTECT_MODE_WP : 0 };
    return ioctl(fd, UFFDIO_WRITEPROTECT, &w) == 0 ? 0 : -errno;
}

int host_uffd_copy(int fd, void *dst, const void *src, uint64_t len) {
    struct uffdio_copy c = { .dst = (uint64_t)dst, .src = (uint64_t)src, .len = len, .mode = 0 };
    if (ioctl(fd, UFFDIO_COPY, &c) == 0) return 0;
    return errno == EEXIST ? 0 : -errno;  /* another thread resolved it first */
}

int host_uffd_wake(int fd, void *addr, uint64_t len) {
    struct uffdio_range r = { .start = (uint64_t)addr, .len = len };
    return ioctl(fd, UFFDIO_WAKE, &r) == 0 ? 0 : -errno;
}

int host_uffd_next_fault(int fd, int stop_fd, int timeout_ms, uint64_t *address, int *is_write, int *is_wp) {
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

int host_map_private_page(void *address, int store_fd, uint64_t store_offset) {
    void *p = mmap(address, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_FIXED, store_fd, (off_t)store_offset);
    return p == MAP_FAILED ? -errno : 0;
}

int host_map_shared_page(void *address, int fd, uint64_t offset) {
    void *p = mmap(address, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, fd, (off_t)offset);
    return p == MAP_FAILED ? -errno : 0;
}

int host_punch_hole(int fd, uint64_t offset, uint64_t length) {
    return fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)offset, (off_t)length) == 0 ? 0 : -errno;
}

int host_pagemap_entries(const void *address, uint64_t count, uint64_t *entries) {
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

int host_setns_net(int fd) {
    return setns(fd, CLONE_NEWNET) == 0 ? 0 : -errno;
}

int host_socket_unsent_bytes(int fd) {
    int n = 0;
    return ioctl(fd, SIOCOUTQ, &n) == 0 ? n : -errno;
}
