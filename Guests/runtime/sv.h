/* Swiftvisor guest runtime: the freestanding C side of docs/guest-abi.md. */
#ifndef SV_H
#define SV_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

struct sv_device { uint32_t type; uint32_t irq; uint64_t base; uint64_t size; };

struct sv_boot_info {
    uint32_t magic;          /* 0x49425653 "SVBI" */
    uint32_t version;
    uint64_t ram_size;
    uint32_t vcpu_count;
    uint32_t hypercall_kind; /* 0 = vmcall, 1 = port doorbell */
    uint16_t hypercall_port;
    uint16_t serial_port;
    uint16_t exit_port;
    uint16_t device_count;
    uint32_t cmdline_size;
    uint32_t flags;          /* SV_BOOT_CONFIDENTIAL, SV_BOOT_SNP */
    uint64_t cmdline_gpa;
    struct sv_device devices[16];
    uint64_t shared_gpa;     /* confidential: the shared (unencrypted) bounce region */
    uint64_t shared_size;
};

/* Confidential VMs (docs/confidential-vm.md): memory encrypted by the host's engine. */
#define SV_BOOT_CONFIDENTIAL 1u
#define SV_BOOT_SNP 2u
#define SV_C_BIT (1ull << 51)
static inline int sv_confidential(void);

#define SV_MAX_CPUS 16
#define SV_BENCH_PORT 0x80
/* Marker port: labs timestamp writes to it on the host (start/end of a measured phase). */
#define SV_MARK_PORT 0x81
static inline void sv_mark(uint8_t v) { __asm__ volatile("outb %0, %1" ::"a"(v), "Nd"((uint16_t)SV_MARK_PORT)); }
#define SV_EXIT_PORT 0xF4

/* Each guest defines this; it runs on every vCPU. The boot CPU's return value becomes
 * the VM's exit status; other CPUs halt when they return. */
int guest_main(const struct sv_boot_info *bi, unsigned cpu);

extern const struct sv_boot_info *sv_boot;

/* Port I/O (allowed at CPL3 too: the runtime enters user mode with IOPL=3). */
static inline void sv_outb(uint16_t port, uint8_t v) { __asm__ volatile("outb %0, %1" ::"a"(v), "Nd"(port)); }
static inline void sv_outl(uint16_t port, uint32_t v) { __asm__ volatile("outl %0, %1" ::"a"(v), "Nd"(port)); }
static inline uint8_t sv_inb(uint16_t port) { uint8_t v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline uint32_t sv_inl(uint16_t port) { uint32_t v; __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port)); return v; }
/* Time stamp counter (the software engine counts retired instructions). */
static inline uint64_t sv_rdtsc(void) { uint32_t lo, hi; __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi)); return (uint64_t)hi << 32 | lo; }
static inline void sv_pause(void) { __asm__ volatile("pause"); }
static inline unsigned sv_cpl(void) { uint16_t cs; __asm__ volatile("mov %%cs, %0" : "=r"(cs)); return cs & 3; }

static inline int sv_confidential(void) { return sv_boot && (sv_boot->flags & SV_BOOT_CONFIDENTIAL); }
/* Validates every private page of RAM (SNP: PVALIDATE); called by the runtime at boot. */
void sv_confidential_start(const struct sv_boot_info *bi);
/* The shared bounce region (confidential) — device-visible memory — or 0 when not confidential. */
void *sv_shared_alloc(size_t size, size_t align);

/* Console on COM1. */
void sv_putc(char c);
void sv_puts(const char *s);
int sv_getc(void);                      /* blocks until a byte arrives */
void sv_printf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void sv_vprintf(const char *fmt, va_list ap);

/* Stops the VM with `code` as its exit status. */
__attribute__((noreturn)) void sv_exit(unsigned code);

/* Hypercall: number in RAX, arguments in RDI, RSI, RDX, R10, result in RAX. */
uint64_t sv_hypercall(uint64_t nr, uint64_t a0, uint64_t a1, uint64_t a2, uint64_t a3);
#define SV_HC_PING 0

/* Command line: value of `key=...` (decimal or 0x-hex), or `def` when absent. */
uint64_t sv_cmdline_u64(const char *key, uint64_t def);

/* Runs fn(arg) at CPL3 with IOPL=3 on this CPU's user stack; returns when fn returns. */
void sv_run_user(void (*fn)(void *), void *arg);

/* Device interrupts: irq n (from boot info) arrives as vector SV_IRQ_VECTOR_BASE + n on
 * the boot CPU. Handlers run at CPL0 with interrupts off. */
#define SV_MAX_IRQS 16
#define SV_IRQ_VECTOR_BASE 0x20
typedef void (*sv_irq_handler)(unsigned irq, void *ctx);
void sv_irq_register(unsigned irq, sv_irq_handler fn, void *ctx);
uint64_t sv_irq_count(unsigned irq);   /* interrupts taken on `irq` */
static inline void sv_irq_enable(void) { __asm__ volatile("sti" ::: "memory"); }
static inline void sv_irq_disable(void) { __asm__ volatile("cli" ::: "memory"); }
/* Sleeps until an interrupt has been handled (CPL0). `sti; hlt` leaves no gap for a
 * wake-up to be lost: STI's shadow covers the HLT. Returns with interrupts off. */
static inline void sv_wait_for_interrupt(void) { __asm__ volatile("sti; hlt; cli" ::: "memory"); }

/* Boot-info device types. */
#define SV_DEV_VIRTIO_MMIO 1
#define SV_DEV_STATUS_PAGE 2
#define SV_DEV_EMULATED_NIC 3
#define SV_DEV_PERIODIC_TIMER 5
#define SV_DEV_PCI_HOST_BRIDGE 6   /* base: ECAM (1 MiB per bus), then the BAR window */
/* S12's shared virtual I/O queue: `out` of a request's work (µs of backend time). */
#define SV_SHARED_QUEUE_PORT 0x520
/* The n-th device of `type` in boot info, or NULL. */
const struct sv_device *sv_find_device(uint32_t type, unsigned n);

/* MMIO register access (volatile, exact width). */
static inline uint32_t sv_mmio_read32(uint64_t a) { return *(volatile uint32_t *)a; }
static inline void sv_mmio_write32(uint64_t a, uint32_t v) { *(volatile uint32_t *)a = v; }
static inline uint8_t sv_mmio_read8(uint64_t a) { return *(volatile uint8_t *)a; }
static inline void sv_mmio_write8(uint64_t a, uint8_t v) { *(volatile uint8_t *)a = v; }

/* A test-and-set spinlock (xchg). */
typedef struct { volatile uint32_t locked; } sv_lock;
void sv_lock_acquire(sv_lock *l);
void sv_lock_release(sv_lock *l);

void *memset(void *d, int c, size_t n);
void *memcpy(void *d, const void *s, size_t n);
void *memmove(void *d, const void *s, size_t n);
int memcmp(const void *a, const void *b, size_t n);

#endif
