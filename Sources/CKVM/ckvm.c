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
int ckvm_get_vcpu_events(int fd, struct kvm_vcpu_events *e) { return rc(ioctl(fd, KVM_GET_VCPU_EVENTS, e)); }
int ckvm_set_vcpu_events(int fd, const struct kvm_vcpu_events *e) { return rc(ioctl(fd, KVM_SET_VCPU_EVENTS, e)); }

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



/* ---- userfaultfd: write protection (copy-on-write snapshots) and missing pages (lazy restore) ---- */








/* ---- page deduplication ---- */






