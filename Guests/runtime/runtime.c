/* Swiftvisor guest runtime: descriptor tables, user mode, console, hypercalls. */
#include "sv.h"

const struct sv_boot_info *sv_boot;

/* ---- descriptor tables, one set per CPU ---- */

struct tss64 {
    uint32_t reserved0;
    uint64_t rsp[3];
    uint64_t reserved1;
    uint64_t ist[7];
    uint64_t reserved2;
    uint16_t reserved3;
    uint16_t iomap_base;
} __attribute__((packed));

struct idt_gate {
    uint16_t offset_low, selector;
    uint8_t ist, type_attr;
    uint16_t offset_mid;
    uint32_t offset_high, zero;
} __attribute__((packed));

struct percpu {
    uint64_t gdt[7];              /* null, kcode, kdata, udata, ucode, tss (2 slots) */
    struct tss64 tss;
    /* An all-zero I/O permission bitmap (every port allowed) and its 0xFF terminator.
     * Architecturally IOPL=3 alone allows CPL3 port I/O, but this host's nested KVM
     * checks the bitmap regardless, so the TSS carries one. */
    uint8_t io_bitmap[8192 + 1];
    struct idt_gate idt[256];
    uint8_t kstack[8192] __attribute__((aligned(16)));
    uint64_t saved_rsp __attribute__((aligned(16)));  /* TSS.RSP0 points here */
    uint8_t ustack[32768] __attribute__((aligned(16)));
};

static struct percpu percpus[SV_MAX_CPUS];
extern const uint64_t sv_exception_stubs[32];
extern const uint64_t sv_irq_stubs[SV_MAX_IRQS];
extern void sv_user_return_isr(void);
extern void sv_enter_user(void (*fn)(void *), void *arg, uint64_t user_rsp, uint64_t *saved_rsp);

#define KCODE 0x08
#define KDATA 0x10
#define TSS_SEL 0x28

struct dtr { uint16_t limit; uint64_t base; } __attribute__((packed));

static void set_gate(struct idt_gate *g, uint64_t handler, uint8_t dpl) {
    g->offset_low = (uint16_t)handler;
    g->selector = KCODE;
    g->ist = 0;
    g->type_attr = (uint8_t)(0x8E | (dpl << 5)); /* present, 64-bit interrupt gate */
    g->offset_mid = (uint16_t)(handler >> 16);
    g->offset_high = (uint32_t)(handler >> 32);
    g->zero = 0;
}

static void setup_cpu(unsigned cpu) {
    struct percpu *p = &percpus[cpu];
    p->gdt[0] = 0;
    p->gdt[1] = 0x00AF9B000000FFFFull;  /* kernel code, 64-bit */
    p->gdt[2] = 0x00CF93000000FFFFull;  /* kernel data */
    p->gdt[3] = 0x00CFF3000000FFFFull;  /* user data, DPL3 (SYSRET-compatible order) */
    p->gdt[4] = 0x00AFFB000000FFFFull;  /* user code, 64-bit, DPL3 */
    uint64_t base = (uint64_t)&p->tss, limit = sizeof(struct tss64) + sizeof p->io_bitmap - 1;
    p->gdt[5] = (limit & 0xFFFF) | ((base & 0xFFFFFF) << 16) | (0x89ull << 40) | (((base >> 24) & 0xFF) << 56);
    p->gdt[6] = base >> 32;
    p->tss.rsp[0] = (uint64_t)&p->saved_rsp;  /* kstack ends here */
    p->tss.iomap_base = sizeof(struct tss64);
    p->io_bitmap[8192] = 0xFF;

    for (int v = 0; v < 32; v++) set_gate(&p->idt[v], sv_exception_stubs[v], 0);
    set_gate(&p->idt[3], (uint64_t)sv_user_return_isr, 3);  /* int3: user code is done */
    for (int i = 0; i < SV_MAX_IRQS; i++) set_gate(&p->idt[SV_IRQ_VECTOR_BASE + i], sv_irq_stubs[i], 0);

    struct dtr gdtr = { sizeof p->gdt - 1, (uint64_t)p->gdt };
    struct dtr idtr = { sizeof p->idt - 1, (uint64_t)p->idt };
    __asm__ volatile(
        "lgdt %0\n\t"
        "lidt %1\n\t"
        "pushq %2\n\t"
        "lea 1f(%%rip), %%rax\n\t"
        "pushq %%rax\n\t"
        "lretq\n"
        "1:\n\t"
        "mov %3, %%eax\n\t"
        "mov %%eax, %%ds\n\t"
        "mov %%eax, %%es\n\t"
        "mov %%eax, %%ss\n\t"
        "mov %%eax, %%fs\n\t"
        "mov %%eax, %%gs\n\t"
        "mov %4, %%eax\n\t"
        "ltr %%ax\n\t"
        :
        : "m"(gdtr), "m"(idtr), "i"(KCODE), "i"(KDATA), "i"(TSS_SEL)
        : "rax", "memory");
}

/* This CPU's block: its GDT lives inside it, and GDTR is per CPU. */
static struct percpu *this_cpu(void) {
    struct dtr gdtr;
    __asm__ volatile("sgdt %0" : "=m"(gdtr));
    return &percpus[(gdtr.base - (uint64_t)percpus) / sizeof(struct percpu)];
}

void sv_run_user(void (*fn)(void *), void *arg) {
    struct percpu *p = this_cpu();
    sv_enter_user(fn, arg, (uint64_t)(p->ustack + sizeof p->ustack), &p->saved_rsp);
}

/* ---- device interrupts ---- */

static struct { sv_irq_handler fn; void *ctx; } irq_handlers[SV_MAX_IRQS];
static volatile uint64_t irq_counts[SV_MAX_IRQS];

void sv_irq_register(unsigned irq, sv_irq_handler fn, void *ctx) {
    if (irq >= SV_MAX_IRQS) return;
    irq_handlers[irq].ctx = ctx;
    irq_handlers[irq].fn = fn;
}

uint64_t sv_irq_count(unsigned irq) { return irq < SV_MAX_IRQS ? irq_counts[irq] : 0; }

void sv_irq_dispatch(uint64_t irq) {
    if (irq >= SV_MAX_IRQS) return;
    irq_counts[irq]++;
    if (irq_handlers[irq].fn) irq_handlers[irq].fn((unsigned)irq, irq_handlers[irq].ctx);
}

/* ---- exceptions ---- */

struct sv_exception_frame { uint64_t vector, error, rip, cs, rflags, rsp, ss; };

static void raw_puts(const char *s);
static void raw_hex(uint64_t v);

void sv_exception(struct sv_exception_frame *f) {
    /* No lock: the fault may have happened while the console lock was held. */
    if (f->vector == 29) raw_puts("#VC: reverse-map violation (the host changed a private page); ");
    raw_puts("exception ");
    char d[3] = { (char)('0' + f->vector / 10), (char)('0' + f->vector % 10), 0 };
    raw_puts(f->vector >= 10 ? d : d + 1);
    raw_puts(" error=");
    raw_hex(f->error);
    raw_puts(" rip=");
    raw_hex(f->rip);
    raw_puts("\n");
    sv_exit(0x80 + (unsigned)f->vector);
}

/* ---- console ---- */

static sv_lock console_lock;

static void serial_out(char c) {
    uint16_t port = sv_boot ? sv_boot->serial_port : 0x3F8;
    while (!(sv_inb(port + 5) & 0x20)) sv_pause();  /* LSR.THRE */
    sv_outb(port, (uint8_t)c);
}

static void raw_puts(const char *s) { while (*s) serial_out(*s++); }

static void raw_hex(uint64_t v) {
    char buf[19] = "0x";
    int n = 0;
    uint64_t t = v;
    do { n++; t >>= 4; } while (t);
    for (int i = n - 1; i >= 0; i--, v >>= 4) buf[2 + i] = "0123456789abcdef"[v & 15];
    buf[2 + n] = 0;
    raw_puts(buf);
}

void sv_putc(char c) {
    sv_lock_acquire(&console_lock);
    serial_out(c);
    sv_lock_release(&console_lock);
}

void sv_puts(const char *s) {
    sv_lock_acquire(&console_lock);
    raw_puts(s);
    sv_lock_release(&console_lock);
}

int sv_getc(void) {
    uint16_t port = sv_boot->serial_port;
    while (!(sv_inb(port + 5) & 0x01)) sv_pause();  /* LSR.DR */
    return sv_inb(port);
}

static void emit_number(uint64_t v, int negative, unsigned base, int upper, int width, char pad, int left, int alt) {
    char buf[24];
    int n = 0;
    const char *digits = upper ? "0123456789ABCDEF" : "0123456789abcdef";
    do { buf[n++] = digits[v % base]; v /= base; } while (v);
    int len = n + negative + (alt ? 2 : 0);
    if (!left && pad == ' ') for (; width > len; width--) serial_out(' ');
    if (negative) serial_out('-');
    if (alt) { serial_out('0'); serial_out(upper ? 'X' : 'x'); }
    if (!left && pad == '0') for (; width > len; width--) serial_out('0');
    while (n) serial_out(buf[--n]);
    if (left) for (; width > len; width--) serial_out(' ');
}

void sv_vprintf(const char *fmt, va_list ap) {
    sv_lock_acquire(&console_lock);
    for (; *fmt; fmt++) {
        if (*fmt != '%') { serial_out(*fmt); continue; }
        fmt++;
        int left = 0, alt = 0, width = 0, longs = 0;
        char pad = ' ';
        for (;; fmt++) {
            if (*fmt == '-') left = 1;
            else if (*fmt == '0') pad = '0';
            else if (*fmt == '#') alt = 1;
            else break;
        }
        while (*fmt >= '0' && *fmt <= '9') width = width * 10 + (*fmt++ - '0');
        while (*fmt == 'l' || *fmt == 'z') { longs++; fmt++; }
        switch (*fmt) {
        case 'd': case 'i': {
            int64_t v = longs ? va_arg(ap, int64_t) : va_arg(ap, int);
            emit_number(v < 0 ? (uint64_t)0 - (uint64_t)v : (uint64_t)v, v < 0, 10, 0, width, pad, left, 0);
            break;
        }
        case 'u': case 'x': case 'X': {
            uint64_t v = longs ? va_arg(ap, uint64_t) : va_arg(ap, unsigned);
            emit_number(v, 0, *fmt == 'u' ? 10 : 16, *fmt == 'X', width, pad, left, alt && *fmt != 'u');
            break;
        }
        case 'p':
            emit_number((uint64_t)va_arg(ap, void *), 0, 16, 0, width, pad, left, 1);
            break;
        case 's': {
            const char *s = va_arg(ap, const char *);
            if (!s) s = "(null)";
            int len = 0;
            while (s[len]) len++;
            if (!left) for (; width > len; width--) serial_out(' ');
            raw_puts(s);
            if (left) for (; width > len; width--) serial_out(' ');
            break;
        }
        case 'c': serial_out((char)va_arg(ap, int)); break;
        case '%': serial_out('%'); break;
        case 0: fmt--; break;
        default: serial_out('%'); serial_out(*fmt); break;
        }
    }
    sv_lock_release(&console_lock);
}

void sv_printf(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    sv_vprintf(fmt, ap);
    va_end(ap);
}

/* ---- VMM interface ---- */

void sv_exit(unsigned code) {
    for (;;) {
        sv_outb(SV_EXIT_PORT, (uint8_t)code);
        __asm__ volatile("cli; hlt");
    }
}

uint64_t sv_hypercall(uint64_t nr, uint64_t a0, uint64_t a1, uint64_t a2, uint64_t a3) {
    register uint64_t r10 __asm__("r10") = a3;
    if (sv_boot->hypercall_kind == 0)
        __asm__ volatile("vmcall" : "+a"(nr) : "D"(a0), "S"(a1), "d"(a2), "r"(r10) : "memory");
    else
        __asm__ volatile("outl %%eax, $0xF6" : "+a"(nr) : "D"(a0), "S"(a1), "d"(a2), "r"(r10) : "memory");
    return nr;
}

uint64_t sv_cmdline_u64(const char *key, uint64_t def) {
    const char *s = (const char *)sv_boot->cmdline_gpa;
    size_t klen = 0;
    while (key[klen]) klen++;
    for (size_t i = 0; s[i]; i++) {
        if (i > 0 && s[i - 1] != ' ') continue;
        size_t k = 0;
        while (k < klen && s[i + k] == key[k]) k++;
        if (k != klen || s[i + k] != '=') continue;
        const char *v = s + i + k + 1;
        uint64_t r = 0;
        unsigned base = 10;
        if (v[0] == '0' && (v[1] == 'x' || v[1] == 'X')) { base = 16; v += 2; }
        for (;; v++) {
            unsigned d;
            if (*v >= '0' && *v <= '9') d = (unsigned)(*v - '0');
            else if (base == 16 && *v >= 'a' && *v <= 'f') d = (unsigned)(*v - 'a' + 10);
            else if (base == 16 && *v >= 'A' && *v <= 'F') d = (unsigned)(*v - 'A' + 10);
            else break;
            r = r * base + d;
        }
        return r;
    }
    return def;
}

void sv_lock_acquire(sv_lock *l) {
    while (__atomic_exchange_n(&l->locked, 1, __ATOMIC_ACQUIRE))
        while (__atomic_load_n(&l->locked, __ATOMIC_RELAXED)) sv_pause();
}

void sv_lock_release(sv_lock *l) { __atomic_store_n(&l->locked, 0, __ATOMIC_RELEASE); }

/* ---- start ---- */

void sv_runtime_start(const struct sv_boot_info *bi, unsigned cpu) {
    sv_boot = bi;
    if (cpu >= SV_MAX_CPUS) for (;;) __asm__ volatile("cli; hlt");
    setup_cpu(cpu);
    if (cpu == 0) sv_confidential_start(bi);
    int status = guest_main(bi, cpu);
    if (cpu == 0) sv_exit((unsigned)status);
}

/* ---- what the compiler may call ---- */

void *memset(void *d, int c, size_t n) {
    uint8_t *p = d;
    while (n--) *p++ = (uint8_t)c;
    return d;
}

void *memcpy(void *d, const void *s, size_t n) {
    uint8_t *p = d;
    const uint8_t *q = s;
    while (n--) *p++ = *q++;
    return d;
}

void *memmove(void *d, const void *s, size_t n) {
    uint8_t *p = d;
    const uint8_t *q = s;
    if (p < q) while (n--) *p++ = *q++;
    else while (n--) p[n] = q[n];
    return d;
}

int memcmp(const void *a, const void *b, size_t n) {
    const uint8_t *p = a, *q = b;
    for (; n; n--, p++, q++) if (*p != *q) return *p - *q;
    return 0;
}

const struct sv_device *sv_find_device(uint32_t type, unsigned n) {
    if (!sv_boot) return 0;
    for (unsigned i = 0; i < sv_boot->device_count && i < 16; i++) {
        if (sv_boot->devices[i].type == type && n-- == 0) return &sv_boot->devices[i];
    }
    return 0;
}
